"""Sampling and KV-cache options are checked once, when the value is made, and map onto mlx-lm's own samplers and
logits processors (compared with `mlx_lm.sample_utils` called directly)."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlx_internvl.errors import UserError
from mlx_internvl.sampling import KVOptions, SamplingOptions, split_options


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -1), ("top_k", 2.5), ("min_p", 1.5), ("min_p", -0.1), ("min_tokens_to_keep", 0),
    ("xtc_probability", 2.0), ("xtc_threshold", 0.6), ("repetition_penalty", 0.0), ("presence_penalty", math.nan),
    ("frequency_context_size", 0), ("seed", -1), ("logit_bias", {5: math.inf}), ("logit_bias", {-1: 1.0}),
])
def test_bad_sampling_values_name_the_field(field, value):
    with pytest.raises(UserError, match=field.split("_bias")[0]):
        SamplingOptions(**{field: value})


@pytest.mark.parametrize("field,value", [
    ("kv_bits", 5), ("kv_group_size", 48), ("max_kv_size", 4), ("prefill_step_size", 0), ("quantized_kv_start", -1),
])
def test_bad_kv_values_name_the_field(field, value):
    with pytest.raises(UserError, match=field):
        KVOptions(**{field: value})


def test_keywords_fill_either_value_and_unknown_ones_are_refused():
    sampling, kv = split_options(SamplingOptions(top_k=5), None, {"temperature": 0.5, "kv_bits": 8})
    assert (sampling.temperature, sampling.top_k, kv.kv_bits) == (0.5, 5, 8)
    with pytest.raises(TypeError, match="temprature"):
        split_options(None, None, {"temprature": 0.5})


def test_sampler_and_processors_are_mlx_lms():
    logits = mx.random.normal((1, 64), key=mx.random.key(3))
    history = mx.array([1, 2, 3, 2, 7])
    options = SamplingOptions(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.3,
                              presence_penalty=0.4, frequency_penalty=0.2, logit_bias={4: 2.0}, seed=11)
    sampler, processors = options.make()
    ours = logits
    for p in processors:
        ours = p(history, ours)
    theirs = logits
    for p in make_logits_processors(logit_bias={4: 2.0}, repetition_penalty=1.3, presence_penalty=0.4,
                                    frequency_penalty=0.2):
        theirs = p(history, theirs)
    assert mx.array_equal(ours, theirs).item()
    reference = make_sampler(temp=0.8, top_p=0.9, min_p=0.05, top_k=20)
    mx.random.seed(11)
    want = [reference(theirs).item() for _ in range(8)]
    options.make()  # seeds again
    assert [sampler(ours).item() for _ in range(8)] == want

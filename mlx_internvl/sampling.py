"""How to pick tokens and how to keep the KV cache: two values, each checked once, passed as one thing from the CLI
(or the server) to `generate`, `stream_generate`, `batch_generate` and `ChatSession`.

- `SamplingOptions` covers every parameter of mlx-lm's `make_sampler` and `make_logits_processors` (temperature,
  top-p/k, min-p, XTC, repetition/presence/frequency penalties with their context sizes, logit bias) and the seed.
  Temperature 0 is greedy, as the model cards run the models.
- `KVOptions`: mlx-lm's cache settings. `kv_bits` quantizes the cache once it holds `quantized_kv_start` tokens;
  `max_kv_size` makes it a rotating cache that keeps the first 4 and the last tokens (image tokens in the middle
  of a long prompt can be evicted); `prefill_step_size` is the prompt chunk per forward pass.
- `split_options` lets the functions also take these fields as keyword arguments (`generate(..., temperature=0.7)`).
- `INT_RANGES` states the range of every integer field once; the CLI (`click.IntRange`) and the server (pydantic
  `Field(ge=, le=)`) take their bounds from it, so a number out of range is refused where it enters.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import apply_top_p, make_logits_processors, make_sampler

from .distributed import agree
from .errors import UserError
from .validate import COUNT_MAX, SEED_MAX

INT_RANGES = {
    "top_k": (0, COUNT_MAX), "min_tokens_to_keep": (1, COUNT_MAX), "repetition_context_size": (1, COUNT_MAX),
    "presence_context_size": (1, COUNT_MAX), "frequency_context_size": (1, COUNT_MAX), "seed": (0, SEED_MAX),
    "quantized_kv_start": (0, COUNT_MAX), "max_kv_size": (8, COUNT_MAX), "prefill_step_size": (1, COUNT_MAX),
    "max_tokens": (1, COUNT_MAX),
}
_TOKEN_ID = re.compile(r"[0-9]{1,10}")


def parse_token_id(text: str, vocab_size: Optional[int] = None) -> int:
    """A token id written as decimal ASCII digits (JSON object keys are strings), in [0, vocab_size). `str.isdigit`
    and `int()` accept more (superscripts, other scripts' digits, signs, spaces, underscores, 5000 digits)."""
    if not isinstance(text, str) or not _TOKEN_ID.fullmatch(text) or (vocab_size is not None
                                                                      and int(text) >= vocab_size):
        span = f"in [0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise UserError(f"logit_bias: key {text[:40]!r} is not a token id {span}; write ids as decimal digits, "
                        "e.g. {\"42\": -100}")
    return int(text)


def _number(name: str, value, low: float = -math.inf, high: float = math.inf, low_open: bool = False,
            integer: bool = False) -> None:
    """A clear error unless `value` is a finite number in [low, high] (or (low, high] with `low_open`)."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise UserError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise UserError(f"{name} must be finite, got {value}")
    if value < low or value > high or (low_open and value == low):
        left = "(" if low_open else "["
        span = (f"in {left}{low}, {high}]" if math.isfinite(high) else
                f"{'>' if low_open else '>='} {low}")
        raise UserError(f"{name} must be {span}, got {value}")


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0
    top_p: float = 1.0  # 1 disables
    top_k: int = 0  # 0 disables
    min_p: float = 0.0  # 0 disables
    min_tokens_to_keep: int = 1
    xtc_probability: float = 0.0  # 0 disables XTC
    xtc_threshold: float = 0.1
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    presence_penalty: Optional[float] = None
    presence_context_size: int = 20
    frequency_penalty: Optional[float] = None
    frequency_context_size: int = 20
    logit_bias: Optional[Dict[int, float]] = None
    seed: Optional[int] = None

    def __post_init__(self):
        _number("temperature", self.temperature, 0.0)
        _number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _number("min_p", self.min_p, 0.0, 1.0)
        _number("xtc_probability", self.xtc_probability, 0.0, 1.0)
        _number("xtc_threshold", self.xtc_threshold, 0.0, 0.5)
        if self.repetition_penalty is not None:
            _number("repetition_penalty", self.repetition_penalty, 0.0, low_open=True)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name))
        for name in ("top_k", "min_tokens_to_keep", "repetition_context_size", "presence_context_size",
                     "frequency_context_size", "seed"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), *INT_RANGES[name], integer=True)
        for token, bias in (self.logit_bias or {}).items():
            _number(f"logit_bias key {token!r}", token, 0, COUNT_MAX, integer=True)
            _number(f"logit_bias[{token}]", bias)

    def check(self, model) -> None:
        """The settings that depend on the model: a logit_bias id past its vocabulary would index out of bounds."""
        vocab = model.config.llm_config["vocab_size"]
        bad = sorted(t for t in self.logit_bias or {} if t >= vocab)
        if bad:
            raise UserError(f"logit_bias: {bad[0]} is not a token id of this model, whose vocabulary has {vocab} ids "
                            f"(0 to {vocab - 1})")

    def make(self, special_tokens=()) -> Tuple[object, list]:
        """`(sampler, logits_processors)` from mlx-lm, seeding MLX's generator when `seed` is set. XTC never drops
        `special_tokens` (pass the end-of-turn ids, as mlx-lm's server does)."""
        if self.seed is not None:
            mx.random.seed(self.seed)
        sampler = make_sampler(temp=self.temperature, top_p=self.top_p if self.top_p < 1.0 else 0.0,
                               min_p=self.min_p, min_tokens_to_keep=self.min_tokens_to_keep, top_k=self.top_k,
                               xtc_probability=self.xtc_probability, xtc_threshold=self.xtc_threshold,
                               xtc_special_tokens=list(special_tokens))
        # Under mlx.launch every rank takes rank 0's token (no-op in one process).
        sampler = agree(sampler)
        processors = make_logits_processors(
            logit_bias=self.logit_bias, repetition_penalty=self.repetition_penalty,
            repetition_context_size=self.repetition_context_size, presence_penalty=self.presence_penalty,
            presence_context_size=self.presence_context_size, frequency_penalty=self.frequency_penalty,
            frequency_context_size=self.frequency_context_size)
        return sampler, processors


def seeded_sampler(temperature: float, top_p: float, seed: int):
    """mlx-lm's sampling (its top-p filter, then a categorical draw at `temperature`) from the request's own random
    key, so a seeded reply does not depend on what else is in the batch."""
    key = mx.random.key(seed)

    def sample(logprobs):
        nonlocal key
        key, sub = mx.random.split(key)
        if 0.0 < top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1.0 / temperature), key=sub)

    return sample


@dataclass(frozen=True)
class KVOptions:
    kv_bits: Optional[int] = None  # 2, 3, 4, 6 or 8: quantize the cache
    kv_group_size: int = 64
    quantized_kv_start: int = 0
    max_kv_size: Optional[int] = None  # a rotating cache of this many tokens
    prefill_step_size: int = 2048

    def __post_init__(self):
        if self.kv_bits is not None and self.kv_bits not in (2, 3, 4, 6, 8):
            raise UserError(f"kv_bits must be one of 2, 3, 4, 6, 8, got {self.kv_bits}")
        if self.kv_group_size not in (32, 64, 128):
            raise UserError(f"kv_group_size must be 32, 64 or 128, got {self.kv_group_size}")
        for name in ("quantized_kv_start", "max_kv_size", "prefill_step_size"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), *INT_RANGES[name], integer=True)

    def check(self, model) -> None:
        """The settings that depend on the model: the quantization group must divide the head size."""
        llm = model.config.llm_config
        head_dim = llm.get("head_dim") or llm["hidden_size"] // llm["num_attention_heads"]
        if self.kv_bits is not None and head_dim % self.kv_group_size:
            raise UserError(f"kv_bits {self.kv_bits}: the KV cache is quantized in groups of kv_group_size "
                            f"{self.kv_group_size}, which must divide this model's head size {head_dim}; leave the "
                            "cache unquantized or choose another kv_group_size")

    def make_cache(self, model) -> list:
        """A fresh mlx-lm prompt cache for `model` (rotating when `max_kv_size` is set)."""
        return make_prompt_cache(model.language_model, max_kv_size=self.max_kv_size)

    def step_kwargs(self) -> dict:
        """The arguments mlx-lm's `generate_step` takes from these settings."""
        return dict(prefill_step_size=self.prefill_step_size, kv_bits=self.kv_bits,
                    kv_group_size=self.kv_group_size, quantized_kv_start=self.quantized_kv_start)


SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingOptions)}
KV_FIELDS = {f.name for f in dataclasses.fields(KVOptions)}


def split_options(sampling: Optional[SamplingOptions], kv: Optional[KVOptions], options: dict
                  ) -> Tuple[SamplingOptions, KVOptions]:
    """`sampling` and `kv` (defaults when None) with the fields named in `options` replaced; an unknown name is a
    TypeError, as for any unexpected keyword argument."""
    unknown = set(options) - SAMPLING_FIELDS - KV_FIELDS
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    sampling = dataclasses.replace(sampling or SamplingOptions(),
                                   **{k: v for k, v in options.items() if k in SAMPLING_FIELDS})
    kv = dataclasses.replace(kv or KVOptions(), **{k: v for k, v in options.items() if k in KV_FIELDS})
    return sampling, kv

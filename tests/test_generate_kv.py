"""KV-cache options of generation (mlx-lm's quantized and rotating caches) on a tiny checkpoint."""

import pytest
from conftest import ASSETS

import mlx_internvl
from builders import Case
from mlx_internvl.errors import UserError
from mlx_internvl.generate import stream_generate

IMG = ASSETS / "images" / "image1.jpg"


@pytest.fixture(scope="module")
def loaded(build_case):
    # Two heads of 32: mlx's quantized KV cache needs group sizes of 32, 64 or 128.
    built = build_case(Case("kv_qwen2", extra_text={"num_attention_heads": 2}))
    return mlx_internvl.load(built.original_dir, dtype="float32")


def tokens(model, processor, **kw):
    return [p.token for p in stream_generate(model, processor, "Describe it.", [IMG], max_tokens=12, max_tiles=2, **kw)]


def test_rotating_cache_larger_than_the_request_changes_nothing(loaded):
    model, processor = loaded
    n_prompt = processor("Describe it.", images=[IMG], max_tiles=2)["input_ids"].shape[1]
    assert tokens(model, processor, max_kv_size=n_prompt + 64) == tokens(model, processor)


def test_quantized_cache_keeps_the_prefill_token_and_stays_close(loaded):
    model, processor = loaded
    plain = tokens(model, processor)
    quant = tokens(model, processor, kv_bits=8, kv_group_size=32)
    # The first token comes from the full-precision prefill; later ones read 8-bit keys/values.
    assert quant[0] == plain[0]
    assert len(quant) == len(plain)
    assert sum(a == b for a, b in zip(plain, quant)) >= len(plain) // 2


@pytest.mark.parametrize("kw", [{"kv_bits": 5}, {"kv_bits": 4, "kv_group_size": 64}, {"max_kv_size": 2}])
def test_bad_kv_options_are_user_errors(loaded, kw):
    model, processor = loaded
    with pytest.raises(UserError):
        tokens(model, processor, **kw)

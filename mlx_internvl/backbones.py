"""Which mlx-lm model runs which InternVL language model, and the two thin adapters we need on top.

The backbones are mlx-lm's own classes, never copies:
- Qwen2/2.5 -> `mlx_lm.models.qwen2`, Qwen3 -> `qwen3`, Qwen3-MoE -> `qwen3_moe`, Llama -> `llama`;
- InternLM2/2.5 -> `llama` after splitting the fused `wqkv` (what transformers' official converter does);
- Phi-3 -> `phi3`.

Adapters:
- mlx-lm's Phi-3 takes no `input_embeddings`, so `forward_embeddings` runs its layers from given embeddings;
- mlx-lm's `SuScaledRoPE` always uses `long_factor`, while the reference Phi-3 uses `short_factor` until the
  sequence passes `original_max_position_embeddings`; `LongRoPE` restores that switch.
"""

from __future__ import annotations

import importlib
import inspect
import math
from functools import cache
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from .config import LANGUAGE_MODELS
from .errors import UserError

# The mlx-lm models that run the supported language models, in the order LANGUAGE_MODELS lists them.
SUPPORTED = tuple(dict.fromkeys(lm.mlx_type for lm in LANGUAGE_MODELS.values()))


def backbone_module(model_type: str):
    if model_type not in SUPPORTED:
        raise UserError(f"language model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}.")
    return importlib.import_module(f"mlx_lm.models.{model_type}")


class LongRoPE(nn.Module):
    """Phi-3 `longrope`/`su` rotary embedding with the short/long factor switch of the reference implementation.

    The factors in use are chosen per call from the last position it covers (`offset + L`): short while that is at
    most `original_max_position_embeddings`, long beyond. Keys cached before the switch keep their old rotation,
    exactly as in transformers.
    """

    def __init__(self, dims: int, base: float, max_position_embeddings: int, original_max_position_embeddings: int,
                 short_factor, long_factor, factor: Optional[float] = None, attention_factor: Optional[float] = None):
        super().__init__()
        self.dims = dims
        self.original_max = original_max_position_embeddings
        freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        self._short = mx.array(short_factor, dtype=mx.float32) * freqs
        self._long = mx.array(long_factor, dtype=mx.float32) * freqs
        if factor is None:
            factor = max_position_embeddings / original_max_position_embeddings
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.original_max))
        self.attention_factor = attention_factor

    def __call__(self, x: mx.array, offset: Any = 0) -> mx.array:
        last = offset if isinstance(offset, int) else int(mx.max(offset).item())
        freqs = self._long if last + x.shape[-2] > self.original_max else self._short
        if self.attention_factor != 1.0:
            x = x.at[..., : self.dims].multiply(self.attention_factor)
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)


def _install_phi3_longrope(model: nn.Module, llm_config: dict) -> None:
    rs = llm_config.get("rope_scaling") or {}
    if rs.get("type") not in ("longrope", "su"):
        return
    for layer in model.model.layers:
        attn = layer.self_attn
        head_dim = attn.head_dim
        dims = int(head_dim * llm_config.get("partial_rotary_factor", 1.0))
        attn.rope = LongRoPE(
            dims,
            base=llm_config.get("rope_theta", 10000.0),
            max_position_embeddings=llm_config.get("max_position_embeddings", 131072),
            original_max_position_embeddings=llm_config.get(
                "original_max_position_embeddings", rs.get("original_max_position_embeddings", 4096)
            ),
            short_factor=rs["short_factor"],
            long_factor=rs["long_factor"],
            factor=rs.get("factor"),
            attention_factor=rs.get("attention_factor"),
        )


def build_language_model(llm_config: dict) -> nn.Module:
    """An mlx-lm `Model` for this config (weights uninitialised until loaded)."""
    module = backbone_module(llm_config["model_type"])
    params = inspect.signature(module.ModelArgs).parameters
    args = module.ModelArgs(**{k: v for k, v in llm_config.items() if k in params})
    model = module.Model(args)
    if llm_config["model_type"] == "phi3":
        _install_phi3_longrope(model, llm_config)
    return model


def embedding_layer(lm: nn.Module) -> nn.Module:
    return lm.model.embed_tokens


@cache
def _accepts_input_embeddings(model_class: type) -> bool:
    return "input_embeddings" in inspect.signature(model_class.__call__).parameters


def forward_embeddings(lm: nn.Module, embeddings: mx.array, cache: Optional[list] = None) -> mx.array:
    """Logits `[B, L, V]` from input embeddings `[B, L, D]`, with mlx-lm's KV cache."""
    if _accepts_input_embeddings(type(lm)):
        return lm(None, cache=cache, input_embeddings=embeddings)
    # Same steps as the backbone's own forward, starting after the token-embedding lookup.
    inner = lm.model
    h = embeddings
    layers = inner.layers
    if cache is None:
        cache = [None] * len(layers)
    mask = create_attention_mask(h, cache[0])
    for layer, c in zip(layers, cache):
        h = layer(h, mask, c)
    h = inner.norm(h)
    if lm.args.tie_word_embeddings:
        return inner.embed_tokens.as_linear(h)
    return lm.lm_head(h)

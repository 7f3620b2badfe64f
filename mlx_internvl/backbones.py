"""Which mlx-lm model runs which InternVL language model, and the two thin adapters we need on top.

The backbones are mlx-lm's own classes, never copies:
- Qwen2/2.5 -> `mlx_lm.models.qwen2`, Qwen3 -> `qwen3`, Qwen3-MoE -> `qwen3_moe`, Llama -> `llama`;
- InternLM2/2.5 -> `llama` after splitting the fused `wqkv` (what transformers' official converter does);
- Phi-3 -> `phi3`;
- GPT-OSS -> `gpt_oss` (attention sinks, alternating sliding-window / full layers with their own cache types, MoE).

Adapters:
- mlx-lm's Phi-3 takes no `input_embeddings`, so `forward_embeddings` runs its layers from given embeddings;
- mlx-lm's GPT-OSS takes them only in its inner model (which builds the sliding and full masks), so
  `forward_embeddings` calls that and applies the head;
- every attention layer's rope is replaced where the backbone's own is not right per row of a decode batch or
  ignores the config's scaling (`rope.install`: dynamic NTK, longrope's short/long switch, Qwen3-MoE's scaling).
"""

from __future__ import annotations

import importlib
import inspect
from functools import cache
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from . import rope
from .config import LANGUAGE_MODELS
from .errors import UserError

# The mlx-lm models that run the supported language models, in the order LANGUAGE_MODELS lists them.
SUPPORTED = tuple(dict.fromkeys(lm.mlx_type for lm in LANGUAGE_MODELS.values()))


def backbone_module(model_type: str):
    if model_type not in SUPPORTED:
        raise UserError(f"language model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}.")
    return importlib.import_module(f"mlx_lm.models.{model_type}")


def build_language_model(llm_config: dict) -> nn.Module:
    """An mlx-lm `Model` for this config (weights uninitialised until loaded)."""
    module = backbone_module(llm_config["model_type"])
    params = inspect.signature(module.ModelArgs).parameters
    args = module.ModelArgs(**{k: v for k, v in llm_config.items() if k in params})
    model = module.Model(args)
    rope.install(model, llm_config)
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
    if _accepts_input_embeddings(type(lm.model)):
        return lm.lm_head(lm.model(None, cache=cache, input_embeddings=embeddings))
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

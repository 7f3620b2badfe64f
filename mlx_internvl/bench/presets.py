"""Full-size architecture presets with random weights, shaped like the released checkpoints' configs; no download.

Each preset gives the same `ModelConfig` the converter would produce for the real checkpoint, so the MLX model has
exactly the real shapes; and the matching transformers `InternVLConfig` kwargs for the torch side of the benchmark.
"""

from __future__ import annotations

import copy
from typing import Dict

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import ModelConfig, VisionConfig
from ..weights import build_model

VIT_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                image_size=448, patch_size=14, norm_type="layer_norm", layer_norm_eps=1e-6, qkv_bias=True,
                qk_normalization=False)

# name -> llm: llm_config in mlx-lm spelling, arch: the source architecture, image_token_id: the <IMG_CONTEXT> id,
# note: what it stands for; optional vision: VisionConfig fields (default ViT-300M).
PRESETS: Dict[str, dict] = {
    "internvl2_5-1b": dict(
        llm=dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151674, rms_norm_eps=1e-6,
                 rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False),
        arch="Qwen2ForCausalLM", image_token_id=151667, note="ViT-300M + Qwen2.5-0.5B (same shapes as InternVL3-1B)"),
    "internvl3-2b": dict(
        llm=dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=8960, vocab_size=151674, rms_norm_eps=1e-6,
                 rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False,
                 rope_scaling={"type": "dynamic", "rope_type": "dynamic", "factor": 2.0}),
        arch="Qwen2ForCausalLM", image_token_id=151667, note="ViT-300M + Qwen2.5-1.5B"),
    "internvl2_5-2b": dict(
        llm=dict(model_type="llama", hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, intermediate_size=8192, vocab_size=92553, rms_norm_eps=1e-5,
                 rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False,
                 attention_bias=False, mlp_bias=False),
        arch="InternLM2ForCausalLM", image_token_id=92546, note="ViT-300M + InternLM2.5-1.8B (run as Llama)"),
    "internvl3_5-1b": dict(
        llm=dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                 rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=False),
        arch="Qwen3ForCausalLM", image_token_id=151671, note="ViT-300M + Qwen3-0.6B"),
}
# InternVL3.5-1B-Flash: InternVL3.5-1B plus the router and mlp2. The thresholds are benchmark settings (half of a
# request's tiles above the median score compressed), not values read from a released config.
PRESETS["internvl3_5-1b-flash"] = dict(copy.deepcopy(PRESETS["internvl3_5-1b"]), note="InternVL3.5-1B + ViR router",
                                       flash=dict(flash_mode=True, flash_relative_threshold=0.5,
                                                  flash_absolute_threshold=0.0))
PRESETS["internvl3-1b"] = dict(copy.deepcopy(PRESETS["internvl2_5-1b"]), note="same shapes as InternVL2.5-1B")
PRESETS["internvl3-1b"]["llm"]["rope_scaling"] = {"type": "dynamic", "rope_type": "dynamic", "factor": 2.0}


def preset_config(name: str) -> ModelConfig:
    p = PRESETS[name]
    return ModelConfig(vision_config=VisionConfig(**p.get("vision", VIT_300M)), llm_config=copy.deepcopy(p["llm"]),
                       template="internvl2_5", image_token_id=p["image_token_id"], ps_version="v2",
                       source_format="original", source_llm_architecture=p["arch"], **p.get("flash", {}))


def random_model(name: str, dtype=mx.float32, seed: int = 0):
    """The preset's MLX model with seeded random weights (std 0.02 Gaussian, unit norms) in `dtype`."""
    mx.random.seed(seed)
    model = build_model(preset_config(name))

    def init(path, a):
        if path.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layer_norm.weight", "ls1", "ls2")):
            return mx.ones(a.shape, dtype=dtype)
        if path.endswith("bias"):
            return mx.zeros(a.shape, dtype=dtype)
        return (0.02 * mx.random.normal(a.shape)).astype(dtype)

    params = [(k, init(k, v)) for k, v in tree_flatten(model.parameters())]
    model.load_weights(params)
    mx.eval(model.parameters())
    return model


def torch_config_kwargs(name: str) -> dict:
    """`InternVLConfig(**kwargs)` for the same architecture on the torch side."""
    p = PRESETS[name]
    llm = dict(p["llm"])
    text = {k: v for k, v in llm.items() if k not in ("rope_scaling",)}
    if "rope_scaling" in llm:
        text["rope_scaling"] = {"rope_type": "dynamic", "factor": llm["rope_scaling"]["factor"]}
    text.setdefault("pad_token_id", 0)
    v = p.get("vision", VIT_300M)
    vision = dict(hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
                  num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
                  image_size=v["image_size"], patch_size=v["patch_size"], norm_type=v["norm_type"],
                  layer_norm_eps=v["layer_norm_eps"], attention_bias=v["qkv_bias"], use_qk_norm=v["qk_normalization"])
    return dict(vision_config=vision, text_config=text, image_token_id=p["image_token_id"],
                tie_word_embeddings=False)


def weight_bytes(model: nn.Module, prefix: str = "language_model.") -> int:
    """Bytes of the parameters under `prefix` that one decode step reads (embedding table excluded: one row)."""
    total = 0
    for k, v in tree_flatten(model.parameters()):
        if k.startswith(prefix) and "embed_tokens" not in k:
            total += v.nbytes
    return total



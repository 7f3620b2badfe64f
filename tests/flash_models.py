"""A tiny InternVL3.5-Flash model built in memory (no upstream code needed): the test suite's 448 px Qwen2 case
(1024 patches and 256 tokens per tile, as the router's compression needs) plus seeded router and mlp2 weights."""

import dataclasses

import mlx.core as mx
from conftest import ASSETS
from mlx.utils import tree_flatten, tree_unflatten

from builders import Case
from mlx_internvl.model import InternVLChatModel
from mlx_internvl.weights import build_model

CASE = Case("flash_qwen2", image_size=448, seed=5, extra_text={"max_position_embeddings": 8192})
IMG1, IMG2 = ASSETS / "images" / "image1.jpg", ASSETS / "images" / "chelsea.png"
LATER = ASSETS / "images" / "image2.jpg"  # next to IMG1 the router (0.5, 0.0) decides one of IMG1's tiles otherwise
FLASH_PREFIXES = ("mlp2.", "gating.", "pooling_before_gating.")


def flash_model(model, relative: float, absolute: float, seed: int = 3):
    """`model` (a non-Flash MLX model) with a seeded router and mlp2 and the given thresholds, in memory."""
    cfg = dataclasses.replace(model.config, flash_mode=True, flash_relative_threshold=relative,
                              flash_absolute_threshold=absolute, source_path=None)
    out = build_model(cfg)
    out.update(model.parameters(), strict=False)
    mx.random.seed(seed)
    noise = []
    for k, v in tree_flatten(out.parameters()):
        if k.startswith(FLASH_PREFIXES):
            if v.ndim == 1:
                v = (1.0 if "norm" in k and k.endswith("weight") else 0.0) + 0.1 * mx.random.normal(v.shape)
            else:
                v = mx.random.normal(v.shape) * (1.5 / v.shape[-1] ** 0.5)
            noise.append((k, v))
    out.update(tree_unflatten(noise))
    mx.eval(out.parameters())
    return out


def with_context(built_dir, model, n: int):
    """The case's processor with the language model's context (`max_position_embeddings`) set to `n` tokens."""
    from mlx_internvl.processing import Processor

    llm = dict(model.config.llm_config, max_position_embeddings=n)
    return Processor.from_pretrained(built_dir, dataclasses.replace(model.config, llm_config=llm))


def spy_vit(monkeypatch) -> list:
    """A list that gets the tile count of each `flash_tiles` call (the ViT and the router run over those tiles)."""
    calls = []
    real = InternVLChatModel.flash_tiles
    monkeypatch.setattr(InternVLChatModel, "flash_tiles", lambda self, pv: calls.append(pv.shape[0]) or real(self, pv))
    return calls

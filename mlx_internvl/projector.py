"""Pixel (un)shuffle and the `mlp1` projector from vision features to LLM embeddings."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import validate
from .errors import UserError


def pixel_shuffle(x: mx.array, scale_factor: float = 0.5, version: str = "v2") -> mx.array:
    """Fold each r x r block of patches into one token: `[N, G, G, C]` -> `[N, (G/r)^2, r^2 C]`, r = 1/scale.

    The 4C channels of block (i, j) are `[x(ri, rj) | x(ri, rj+1) | ... | x(ri+1, rj) | ...]` (row offset major,
    column offset minor). 'v2' orders the output tokens row-major over blocks (i * G/r + j); 'v1', the original
    InternVL 1.5 layout, orders them column-major (j * G/r + i).
    """
    scale_factor = validate.number("scale_factor", scale_factor, minimum=0, maximum=1, min_open=True)
    validate.choice("version", version, ("v1", "v2"))
    r = round(1 / scale_factor)
    if abs(r * scale_factor - 1) > 1e-6:
        raise UserError(f"pixel_shuffle: scale_factor {scale_factor} is not 1/r for a whole r (0.5 folds 2x2 blocks)")
    if x.ndim != 4:
        raise UserError(f"pixel_shuffle: expected [N, G, G, C] patches, got shape {tuple(x.shape)}")
    n, h, w, c = x.shape
    if h % r or w % r:
        raise UserError(f"pixel_shuffle: grid {h}x{w} is not divisible by {r}")
    x = x.reshape(n, h // r, r, w // r, r, c)
    order = (0, 1, 3, 2, 4, 5) if version == "v2" else (0, 3, 1, 2, 4, 5)
    return x.transpose(order).reshape(n, (h // r) * (w // r), r * r * c)


class Projector(nn.Module):
    """`mlp1`: LayerNorm(eps 1e-5) -> Linear -> exact GELU -> Linear (checkpoint indices 0, 1, 3)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_dim, eps=1e-5)
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.gelu(self.linear_1(self.layer_norm(x))))

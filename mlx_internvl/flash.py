"""InternVL3.5-Flash: the Visual Resolution Router (ViR), as the Flash checkpoints' own modeling code computes it.

- Each tile's 1024 ViT patch features (CLS dropped) are pooled by cross-attention from one learned query
  (`pooling_before_gating`); upstream's steps 3 and 4 run `attn2`/`norm2` again, so `attn3`, `attn4`, `norm3` and
  `norm4` are loaded but compute nothing; `attn2`'s keys and values over the patches, the same in its three steps,
  are projected once. A gating network (four residual MLP blocks, then LayerNorm + Linear to 2, softmax) gives
  `p0`, the probability that the tile is simple.
- Over all tiles of one request: `compress = p0 > quantile(p0, flash_relative_threshold) and
  p0 >= flash_absolute_threshold` (linear-interpolated quantile, as `torch.quantile`). One tile alone is never
  compressed (its quantile is itself).
- A compressed tile is projected by `mlp2` from the pixel shuffle at ratio r^2 (64 tokens instead of 256) and keeps
  the first 64 of its 256 `<IMG_CONTEXT>` positions in the prompt; the rest are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

POOL_HEADS = 16  # upstream CrossAttentionPooling(num_heads=16)


class PoolingAttention(nn.Module):
    """torch `nn.MultiheadAttention(dim, 16, batch_first=True)` without masks (checkpoint names kept)."""

    def __init__(self, dim: int, heads: int = POOL_HEADS):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = mx.zeros((3 * dim, dim))
        self.in_proj_bias = mx.zeros((3 * dim,))
        self.out_proj = nn.Linear(dim, dim)

    def keys_values(self, x: mx.array):
        """The keys and values of `x` `[P, N, D]`, split into heads: `[P, H, N, D/H]` each."""
        d = x.shape[-1]
        w, b = self.in_proj_weight, self.in_proj_bias
        return self._heads(x @ w[d:2 * d].T + b[d:2 * d]), self._heads(x @ w[2 * d:].T + b[2 * d:])

    def _heads(self, t: mx.array) -> mx.array:
        return t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(0, 2, 1, 3)

    def __call__(self, query: mx.array, kv) -> mx.array:
        """`query` `[P, 1, D]` attends over the keys and values `kv` from `keys_values` -> `[P, 1, D]`."""
        d = query.shape[-1]
        q = query @ self.in_proj_weight[:d].T + self.in_proj_bias[:d]
        k, v = kv
        out = mx.fast.scaled_dot_product_attention(self._heads(q), k, v, scale=(d // self.heads) ** -0.5)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(query.shape[0], -1, d))


class CrossAttentionPooling(nn.Module):
    """`pooling_before_gating`: one learned query pooled over each tile's patches; `[P, N, D]` -> `[P, D]`."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_token = mx.zeros((1, dim))
        for i in range(1, 5):
            setattr(self, f"attn{i}", PoolingAttention(dim))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=1e-5))

    def __call__(self, x: mx.array) -> mx.array:
        x = x.astype(self.query_token.dtype)
        out = mx.broadcast_to(self.query_token[None], (x.shape[0], 1, x.shape[-1]))
        out = self.norm1(self.attn1(out, self.attn1.keys_values(x)))
        kv = self.attn2.keys_values(x)  # the patches' keys and values are the same in each of attn2's steps
        for _ in range(3):  # upstream reuses attn2/norm2 for its steps 2, 3 and 4
            out = self.norm2(self.attn2(out, kv))
        return out[:, 0]


class GatingBlock(nn.Module):
    """Linear(D, 4D) -> GELU -> Linear(4D, D) -> LayerNorm (upstream indices 0, 3, 5; dropouts are identity)."""

    def __init__(self, dim: int, expansion: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * expansion)
        self.fc2 = nn.Linear(dim * expansion, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def __call__(self, x: mx.array) -> mx.array:
        return self.norm(self.fc2(nn.gelu(self.fc1(x))))


class Gating(nn.Module):
    """`gating`: four residual blocks, then LayerNorm -> Linear(D, 2) -> softmax; `[P, D]` -> `[P, 2]`."""

    def __init__(self, dim: int):
        super().__init__()
        for i in range(1, 5):
            setattr(self, f"block{i}", GatingBlock(dim))
        self.gate_norm = nn.LayerNorm(dim, eps=1e-5)
        self.gate_proj = nn.Linear(dim, 2)

    def __call__(self, x: mx.array) -> mx.array:
        for i in range(1, 5):
            x = x + getattr(self, f"block{i}")(x)
        return mx.softmax(self.gate_proj(self.gate_norm(x)).astype(mx.float32), axis=-1)


class LowResProjector(nn.Module):
    """`mlp2`: LayerNorm -> Linear(., 2D) -> GELU -> Linear(2D, 2D) -> GELU -> Linear(2D, D) (indices 0, 1, 4, 7)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_dim, eps=1e-5)
        self.linear_1 = nn.Linear(in_dim, 2 * out_dim)
        self.linear_2 = nn.Linear(2 * out_dim, 2 * out_dim)
        self.linear_3 = nn.Linear(2 * out_dim, out_dim)

    def __call__(self, x: mx.array) -> mx.array:
        x = nn.gelu(self.linear_1(self.layer_norm(x)))
        return self.linear_3(nn.gelu(self.linear_2(x)))


@dataclass
class FlashTiles:
    """Both projections of a request's tiles and the router's score: `p0` `[P]` (float32 numpy), `low`
    `[P, n/4, D]` (mlp2), `full` `[P, n, D]` (mlp1)."""

    p0: np.ndarray
    low: mx.array
    full: mx.array

    @property
    def nbytes(self) -> int:  # what the server's feature cache counts against its byte budget
        return self.p0.nbytes + self.low.nbytes + self.full.nbytes

    @staticmethod
    def concat(parts: Sequence[FlashTiles]) -> FlashTiles:
        return FlashTiles(np.concatenate([p.p0 for p in parts]), mx.concatenate([p.low for p in parts]),
                          mx.concatenate([p.full for p in parts]))


def route(p0: np.ndarray, relative: float, absolute: float) -> np.ndarray:
    """The router's decision per tile (True: compress) over one request's tiles `p0` `[P]`."""
    p0 = np.asarray(p0, dtype=np.float32)
    if p0.size == 0:
        return np.zeros(0, dtype=bool)
    threshold = np.float32(np.quantile(p0, relative, method="linear"))
    return (p0 > threshold) & (p0 >= np.float32(absolute))


def select_features(tiles: FlashTiles, compress: np.ndarray) -> mx.array:
    """`[rows, D]`: per tile in order, its mlp2 rows if compressed, else its mlp1 rows."""
    parts = [tiles.low[i] if c else tiles.full[i] for i, c in enumerate(compress)]
    return mx.concatenate(parts) if parts else tiles.full.reshape(0, tiles.full.shape[-1])


def compress_ids(ids: Sequence[int], image_token_id: int, compress: Sequence[bool], per_tile: int,
                 kept: int) -> List[int]:
    """`ids` with, in each run of image tokens, every `per_tile` block of a compressed tile cut to its first `kept`
    positions (tiles numbered across runs in order). The runs must hold `per_tile * len(compress)` tokens."""
    out: List[int] = []
    tile, pos = 0, 0  # pos: position inside the current tile's block
    n_image = sum(1 for t in ids if t == image_token_id)
    if n_image != per_tile * len(compress):
        raise ValueError(f"the prompt has {n_image} image tokens; {len(compress)} tiles need "
                         f"{per_tile * len(compress)}")
    for t in ids:
        if t != image_token_id:
            out.append(t)
            continue
        if not (compress[tile] and pos >= kept):
            out.append(t)
        pos += 1
        if pos == per_tile:
            tile, pos = tile + 1, 0
    return out


def describe(compress: Sequence[bool], p0: Sequence[float]) -> str:
    """One line of the router's decisions for `--verbose`."""
    marks = " ".join(f"{'low' if c else 'full'}({p:.3f})" for c, p in zip(compress, p0))
    return f"Flash router: {int(sum(compress))}/{len(compress)} tiles compressed: {marks}"

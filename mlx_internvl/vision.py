"""InternViT in MLX, both styles: 300M (LayerNorm, qkv bias) and 6B (RMSNorm, joint qk-norm, no qkv bias).

Module names follow the original checkpoint keys (`vision_model.encoder.layers.N.attn.qkv`, `ls1`, `norm1`), so an
original-layout checkpoint maps onto it with renames only; `-hf` checkpoints are fused back into `qkv` on conversion.
Notable details:
- the layer-scale vectors `ls1`/`ls2` multiply each branch before the residual add;
- qk-norm is one RMSNorm over all heads jointly (width C), applied before the split into heads;
- GELU is the exact erf form; there is no final norm after the last layer;
- position embeddings are resized with torch's bicubic (a = -0.75, align_corners=False, computed in float32) only
  when the patch grid differs from the native one; at the native size they are used as stored.
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import VisionConfig


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@lru_cache(maxsize=32)
def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`[out, in]` weights reproducing `F.interpolate(mode='bicubic', align_corners=False)` along one axis.

    Source coordinate (dst + 0.5) * in/out - 0.5, four taps at floor-1..floor+2 clamped to the border, cubic
    convolution with a = -0.75, no antialiasing (torch's behaviour even when downscaling).
    """
    scale = in_size / out_size
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for dst in range(out_size):
        src = (dst + 0.5) * scale - 0.5
        base = math.floor(src)
        t = src - base
        for tap, dist in zip(range(-1, 3), (t + 1, t, 1 - t, 2 - t)):
            idx = min(max(base + tap, 0), in_size - 1)
            m[dst, idx] += _cubic(np.array(dist))
    return m.astype(np.float32)


def resize_position_embedding(pos: mx.array, grid: int, new_h: int, new_w: int) -> mx.array:
    """Resize `[1, 1 + grid^2, C]` position embeddings to a `new_h x new_w` patch grid (CLS row kept as is)."""
    dtype = pos.dtype
    cls_pos, patch_pos = pos[:, :1], pos[0, 1:].astype(mx.float32)
    c = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(grid, grid, c)
    wh = mx.array(torch_bicubic_matrix(grid, new_h))
    ww = mx.array(torch_bicubic_matrix(grid, new_w))
    patch_pos = mx.einsum("ia,abc->ibc", wh, patch_pos)
    patch_pos = mx.einsum("jb,ibc->ijc", ww, patch_pos)
    patch_pos = patch_pos.reshape(1, new_h * new_w, c).astype(dtype)
    return mx.concatenate([cls_pos, patch_pos], axis=1)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        c, p = config.hidden_size, config.patch_size
        self.grid = config.grid_size
        self.patch_size = p
        self.class_embedding = mx.zeros((1, 1, c))
        self.patch_embedding = nn.Conv2d(config.num_channels, c, kernel_size=p, stride=p, bias=True)
        self.position_embedding = mx.zeros((1, self.grid * self.grid + 1, c))

    def __call__(self, pixel_values: mx.array) -> mx.array:
        """`[N, H, W, 3]` pixels -> `[N, 1 + (H/p)(W/p), C]` embeddings (CLS first, patches row-major)."""
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.astype(dtype))
        n, gh, gw, c = x.shape
        x = x.reshape(n, gh * gw, c)
        cls = mx.broadcast_to(self.class_embedding.astype(dtype), (n, 1, c))
        x = mx.concatenate([cls, x], axis=1)
        pos = self.position_embedding
        if (gh, gw) != (self.grid, self.grid):
            pos = resize_position_embedding(pos, self.grid, gh, gw)
        return x + pos.astype(dtype)


class InternAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = c // self.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(c, 3 * c, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = nn.RMSNorm(c, eps=config.layer_norm_eps)
            self.k_norm = nn.RMSNorm(c, eps=config.layer_norm_eps)
        self.proj = nn.Linear(c, c, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        b, n, c = x.shape
        q, k, v = mx.split(self.qkv(x), 3, axis=-1)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(b, n, self.num_heads, self.head_dim).transpose(0, 2, 1, 3) for t in (q, k, v))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(b, n, c))


class InternMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.approximate = config.hidden_act == "gelu_pytorch_tanh"

    def __call__(self, x: mx.array) -> mx.array:
        h = self.fc1(x)
        return self.fc2(nn.gelu_approx(h) if self.approximate else nn.gelu(h))


def _norm(config: VisionConfig) -> nn.Module:
    if config.norm_type == "layer_norm":
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = _norm(config)
        self.norm2 = _norm(config)
        self.ls1 = mx.ones((config.hidden_size,))
        self.ls2 = mx.ones((config.hidden_size,))

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.ls1 * self.attn(self.norm1(x))
        return x + self.ls2 * self.mlp(self.norm2(x))


class InternVisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class InternVisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def layers_needed(self, select_layer: int) -> int:
        """How many encoder layers produce `hidden_states[select_layer]` (index 0 is the embedding output)."""
        n = len(self.encoder.layers)
        return n + 1 + select_layer if select_layer < 0 else select_layer

    def __call__(self, pixel_values: mx.array, select_layer: int = -1) -> mx.array:
        """`[N, H, W, 3]` -> `[N, 1 + patches, C]`, the hidden state after `layers_needed(select_layer)` layers."""
        h = self.embeddings(pixel_values)
        for layer in self.encoder.layers[: self.layers_needed(select_layer)]:
            h = layer(h)
        return h

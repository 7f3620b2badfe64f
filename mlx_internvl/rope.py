"""Rotary embeddings whose frequencies depend on the sequence length, correct for every row of a decode batch.

mlx-lm's batched decoding (`BatchKVCache`) hands each rope module an array of per-row offsets. Plain, linear,
llama3 and yarn rope have fixed frequencies, so `mx.fast.rope` with that array is right for every row. Two kinds
choose their frequencies from the length the sequence has reached, and that length differs between rows:
- dynamic NTK (InternVL3's Qwen2.5, InternVL2/2.5's InternLM2): the base grows with the length once it passes
  `max_position_embeddings`; mlx-lm's `DynamicNTKScalingRoPE` takes the offset as a Python int and fails on an array;
- Phi-3 longrope: short factors up to `original_max_position_embeddings`, long ones beyond (mlx-lm's `SuScaledRoPE`
  always uses the long ones).
Here each row gets the frequencies its own length gives, exactly as if it were decoded alone (transformers decides
once per batch, from the longest row, so a row's reply would depend on what else is in the batch). `mx.fast.rope`
takes one frequency vector per call, so batched calls rotate with per-row angles computed in float32; single
sequences (int offsets: prefill, `generate`) keep the `mx.fast.rope` call. A backbone that ignores the config's
scaling (mlx-lm's Qwen3-MoE builds a plain rope) gets the one mlx-lm's `initialize_rope` builds for it.
YaRN with `truncate: false` (GPT-OSS) keeps its correction range fractional, as transformers does; mlx-lm's
`YarnRoPE` always rounds it to whole dimensions, which moves the frequencies of the ramp.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import DynamicNTKScalingRoPE, SuScaledRoPE, YarnRoPE, initialize_rope


@mx.compile  # one fused kernel instead of a dozen small ones per call
def rope_rows(x: mx.array, dims: int, offset: mx.array, inv_freqs: mx.array, traditional: bool) -> mx.array:
    """`x [B, H, L, D]` rotated by the angles `(offset[b] + t) * inv_freqs[b]` of its own row (`inv_freqs
    [B, dims/2]`, the reciprocal of `mx.fast.rope`'s `freqs`); features past `dims` are left as they are. The
    arithmetic is float32, as in `mx.fast.rope`'s GPU kernel."""
    positions = offset[:, None].astype(mx.float32) + mx.arange(x.shape[-2], dtype=mx.float32)
    theta = (positions[:, :, None] * inv_freqs[:, None, :])[:, None]  # [B, 1, L, dims/2]
    cos, sin = mx.cos(theta), mx.sin(theta)
    rot = x[..., :dims].astype(mx.float32)
    if traditional:  # consecutive pairs
        a, b = rot[..., 0::2], rot[..., 1::2]
        rot = mx.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(rot.shape)
    else:  # the two halves
        a, b = rot[..., : dims // 2], rot[..., dims // 2:]
        rot = mx.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    rot = rot.astype(x.dtype)
    return rot if dims == x.shape[-1] else mx.concatenate([rot, x[..., dims:]], axis=-1)


def _row_offsets(offset: mx.array, batch: int) -> mx.array:
    return mx.broadcast_to(offset.reshape(-1), (batch,))


@mx.compile
def _ntk_rows(x, offset, dims: int, base: float, factor: float, max_positions: int, traditional: bool):
    n = mx.maximum(offset + x.shape[-2], max_positions).astype(mx.float32)
    log_base = math.log(base) + dims / (dims - 2) * mx.log(factor * n / max_positions - (factor - 1))
    inv_freqs = mx.exp(-log_base[:, None] * (mx.arange(0, dims, 2, dtype=mx.float32) / dims))
    return rope_rows(x, dims, offset, inv_freqs, traditional)


class DynamicNTKRoPE(DynamicNTKScalingRoPE):
    """mlx-lm's dynamic NTK rope (same formula as transformers' and InternLM2's), with each batch row's base taken
    from that row's own length: `base * (factor * n / max - (factor - 1)) ** (d / (d - 2))`, n = max(length, max)."""

    def __call__(self, x: mx.array, offset: Any = 0) -> mx.array:
        if not isinstance(offset, mx.array):
            return super().__call__(x, offset)
        return _ntk_rows(x, _row_offsets(offset, x.shape[0]), self.dims, self.base, self.factor,
                         self.max_position_embeddings, self.traditional)


class LongRoPE(nn.Module):
    """Phi-3 `longrope`/`su` rotary embedding with the short/long factor switch of the reference implementation.

    The factors in use are chosen per call, and per batch row, from the last position it covers (`offset + L`):
    short while that is at most `original_max_position_embeddings`, long beyond. Keys cached before the switch
    keep their old rotation, exactly as in transformers.
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
        if self.attention_factor != 1.0:
            x = x.at[..., : self.dims].multiply(self.attention_factor)
        if isinstance(offset, mx.array):
            offset = _row_offsets(offset, x.shape[0])
            long = (offset + x.shape[-2] > self.original_max)[:, None]
            inv_freqs = mx.where(long, 1.0 / self._long, 1.0 / self._short)
            return rope_rows(x, self.dims, offset, inv_freqs, traditional=False)
        freqs = self._long if offset + x.shape[-2] > self.original_max else self._short
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=freqs)


def _longrope(dims: int, llm_config: dict, rs: dict) -> LongRoPE:
    return LongRoPE(
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


def untruncated_yarn_freqs(dims: int, base: float, rs: dict) -> mx.array:
    """YaRN's `mx.fast.rope` frequencies with the correction range left fractional (transformers' `truncate:
    false`): the same blend of extrapolated and interpolated frequencies as mlx-lm's `YarnRoPE`, unrounded bounds."""
    factor, original = rs["factor"], rs.get("original_max_position_embeddings", 4096)

    def bound(rotations):
        return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(bound(rs.get("beta_fast") or 32), 0), min(bound(rs.get("beta_slow") or 1), dims - 1)
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low if high != low else 0.001), 0, 1)
    extra = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    inter = factor * extra
    keep = 1.0 - ramp
    return (inter * extra) / (inter * keep + extra * (1 - keep))


def batch_safe(rope: nn.Module, llm_config: dict) -> nn.Module:
    """The rope module to use in place of the backbone's own `rope`: the same one where fixed frequencies make it
    right for a batch, a per-row one where they depend on the length."""
    rs = llm_config.get("rope_scaling") or {}
    kind = rs.get("type") or rs.get("rope_type") or "default"
    if type(rope) is nn.RoPE and kind not in ("default", "mrope", "longrope", "su") and not (
            kind == "linear" and rope.scale == 1 / rs.get("factor", 1.0)):
        # The backbone ignored the scaling (mlx-lm's Qwen3-MoE builds a plain rope whatever the config says).
        rope = initialize_rope(rope.dims, rope.base, rope.traditional, rs, llm_config.get("max_position_embeddings"))
    if type(rope) is YarnRoPE and rs.get("truncate") is False:
        rope._freqs = untruncated_yarn_freqs(rope.dims, llm_config.get("rope_theta", 10000.0), rs)
    if type(rope) is DynamicNTKScalingRoPE:
        return DynamicNTKRoPE(rope.dims, rope.max_position_embeddings, rope.traditional, rope.base, rope.factor)
    if kind in ("longrope", "su"):
        dims = rope.dim if isinstance(rope, SuScaledRoPE) else rope.dims
        return _longrope(dims, llm_config, rs)
    return rope


def install(model: nn.Module, llm_config: dict) -> None:
    """Give every attention layer of an mlx-lm backbone a rope that is right per row of a batch."""
    for layer in model.model.layers:
        layer.self_attn.rope = batch_safe(layer.self_attn.rope, llm_config)

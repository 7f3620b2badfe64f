"""Stage-by-stage comparison of the MLX model with the torch reference.

Both sides produce the same named stages from the same processor outputs:
vision_features `[P, 1+N, C]` (ViT hidden state at the selected layer, CLS first), image_features `[P, n, D]`
(after pixel shuffle + mlp1), inputs_embeds `[1, L, D]` (image rows merged), logits `[1, L, V]`, and
greedy_tokens (a fixed number of greedy steps, no early stop, each side with its own KV cache).
"""

from __future__ import annotations

from typing import Dict, Optional

import mlx.core as mx
import numpy as np

STAGES = ("vision_features", "image_features", "inputs_embeds", "logits")


def greedy_tokens(model, input_ids: mx.array, pixel_values: Optional[mx.array], n: int) -> np.ndarray:
    """`n` greedy tokens from the MLX model with mlx-lm's KV cache (prefill from merged embeddings)."""
    cache = model.make_cache()
    logits = model(input_ids, pixel_values=pixel_values, cache=cache)
    tok = mx.argmax(logits[:, -1], axis=-1)
    out = [tok]
    for _ in range(n - 1):
        logits = model(tok[:, None], cache=cache)
        tok = mx.argmax(logits[:, -1], axis=-1)
        out.append(tok)
    return np.array(mx.concatenate(out))


def mlx_stages(model, input_ids: mx.array, pixel_values: Optional[mx.array], max_new_tokens: int = 16) -> Dict[str, np.ndarray]:
    out: Dict[str, np.ndarray] = {}
    feats = None
    if pixel_values is not None:
        vit = model.vision_features(pixel_values)
        patch = model.config.vision_config.patch_size
        feats = model.project_features(vit, (pixel_values.shape[1] // patch, pixel_values.shape[2] // patch))
        out["vision_features"] = np.array(vit.astype(mx.float32))
        out["image_features"] = np.array(feats.astype(mx.float32))
    embeds = model.get_input_embeddings(input_ids, image_features=feats)
    out["inputs_embeds"] = np.array(embeds.astype(mx.float32))
    out["logits"] = np.array(model(input_ids, input_embeddings=embeds).astype(mx.float32))
    if max_new_tokens:
        out["greedy_tokens"] = greedy_tokens(model, input_ids, pixel_values, max_new_tokens)
    return out


def compare(reference: Dict[str, np.ndarray], ours: Dict[str, np.ndarray]) -> dict:
    """Per stage: shape, max-abs error, relative error (max-abs / max |reference|); tokens: agreement."""
    report = {}
    for name in STAGES:
        if name not in reference or name not in ours:
            continue
        ref, got = np.asarray(reference[name], np.float64), np.asarray(ours[name], np.float64)
        if ref.shape != got.shape:
            report[name] = {"shape_ref": list(ref.shape), "shape_mlx": list(got.shape), "error": "shape mismatch"}
            continue
        err = float(np.abs(ref - got).max()) if ref.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        report[name] = {"shape": list(ref.shape), "max_abs": err, "rel": err / scale if scale else err,
                        "ref_max_abs_value": scale}
    if "greedy_tokens" in reference and "greedy_tokens" in ours:
        a, b = np.asarray(reference["greedy_tokens"]), np.asarray(ours["greedy_tokens"])
        n = min(len(a), len(b))
        mism = [i for i in range(n) if a[i] != b[i]]
        report["greedy_tokens"] = {"n": int(n), "agree": int(n - len(mism)), "first_mismatch": mism[0] if mism else None,
                                   "reference": a.tolist(), "mlx": b.tolist()}
    return report

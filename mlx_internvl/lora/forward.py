"""The training forward pass: logits with image features merged as inference merges them, and SFT's loss."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..backbones import forward_embeddings
from ..model import scatter_image_features


def training_logits(model, batch: dict, frozen_features: bool) -> mx.array:
    """Logits `[B, L, V]` with image features merged by the batch's gather index (no host sync)."""
    embeds = model.embed_tokens(batch["ids"])
    if "pixel_values" in batch:
        feats = model.extract_feature(batch["pixel_values"].astype(embeds.dtype))
        if frozen_features:
            feats = mx.stop_gradient(feats)
        # The merge of inference, with the positions computed when the batch was made (no host read-back).
        embeds = scatter_image_features(embeds, feats, batch["image_index"], batch["image_mask"])
    return forward_embeddings(model.language_model, embeds)


def loss_sum(model, batch: dict, frozen_features: bool = True):
    """(summed cross-entropy over answer tokens, number of answer tokens); token t is predicted from tokens < t."""
    logits = training_logits(model, batch, frozen_features)[:, :-1]
    weights = batch["mask"][:, 1:]
    ce = nn.losses.cross_entropy(logits, batch["ids"][:, 1:]) * weights
    return ce.astype(mx.float32).sum(), weights.sum()

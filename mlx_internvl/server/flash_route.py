"""The Flash router for the server: a request's prompt shortened by the router's decisions, with cache keys that
carry those decisions, and the reply limit counted from the routed length.

Each image's two projections and router score (`FlashTiles`) are cached by its content key, so a repeated image
costs no ViT pass; the router then decides over all tiles of the request (the decision of one image depends on the
others through the quantile). In the prompt-cache key each image's tokens take a pseudo id made of the image's key
*and* its tiles' decisions: a cached prefix is reused only when the same images were compressed the same way.
The renderer refused only a prompt that cannot fit even with every compressible tile compressed; the routed prompt
is checked here, as `generate` checks it, and its reply limit cut to what is left of the context.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Tuple

import mlx.core as mx

from ..errors import UserError
from ..flash import FlashTiles
from .protocol import APIError


def decided_pseudo_id(key: Tuple, decisions: Tuple[bool, ...]) -> int:
    return -1 - int(hashlib.sha256(repr((key, decisions)).encode()).hexdigest()[:12], 16)


def route_prompt(model, processor, prompt, tiles_cache, stats: dict):
    """(the prompt with compressed ids, decision-keyed `keyed` and its reply limit, its image rows `[rows, D]`, the
    routed `EncodedRequest`); a 400 when the routed prompt does not fit the context. `tiles_cache` is the server's
    `caches.FeatureCache` (bounded by count and bytes)."""
    parts = []
    for spec in prompt.images:
        tiles = tiles_cache.get(spec.key)
        if tiles is None:
            stats["vision_misses"] += 1
            tiles = model.flash_tiles(mx.array(spec.pixel_values()))
            tiles_cache.put(spec.key, tiles)
        else:
            stats["vision_hits"] += 1
        parts.append(tiles)
    enc = model.route_tiles(prompt.ids, FlashTiles.concat(parts))
    try:
        max_tokens = processor.clamp_max_tokens(len(enc.ids), prompt.max_tokens)
    except UserError as e:
        raise APIError(400, f"messages: {e}, after the Flash router compressed {int(enc.compress.sum())} of "
                            f"{len(enc.compress)} tiles; use fewer images, frames or tiles (max_tiles), or less text",
                       "messages", "context_length_exceeded") from None
    keyed, tile = list(enc.ids), 0
    for spec, (start, end) in zip(prompt.images, processor.renderer.image_spans(enc.ids)):
        decisions = tuple(bool(c) for c in enc.compress[tile: tile + spec.num_tiles])
        tile += spec.num_tiles
        keyed[start:end] = [decided_pseudo_id(spec.key, decisions)] * (end - start)
    return dataclasses.replace(prompt, ids=enc.ids, keyed=keyed, max_tokens=max_tokens), enc.features, enc

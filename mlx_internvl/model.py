"""The composite InternVL model: InternViT -> pixel shuffle -> mlp1 -> merge into token embeddings -> mlx-lm LLM."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from .backbones import build_language_model, embedding_layer, forward_embeddings
from .config import ModelConfig
from .errors import UserError
from .flash import CrossAttentionPooling, FlashTiles, Gating, LowResProjector, compress_ids, route, select_features
from .projector import Projector, pixel_shuffle
from .vision import InternVisionModel


def image_positions(input_ids: mx.array, image_token_id: int) -> Tuple[mx.array, mx.array]:
    """`(index, mask)` for `input_ids` `[B, L]`: `mask` marks the image tokens, and the k-th of them (row-major over
    the batch) takes image-feature row `index = k`. Computed once per batch, it lets the merge run without reading
    anything back to the host (as a compiled training step needs)."""
    mask = input_ids == image_token_id
    index = mx.maximum(mx.cumsum(mask.reshape(-1).astype(mx.int32)) - 1, 0).reshape(mask.shape)
    return index, mask


def scatter_image_features(inputs_embeds: mx.array, image_features: mx.array, index: mx.array,
                           mask: mx.array) -> mx.array:
    """`inputs_embeds` `[B, L, D]` with feature row `index[b, l]` wherever `mask[b, l]` (see `image_positions`)."""
    rows = image_features.reshape(-1, inputs_embeds.shape[-1])[index].astype(inputs_embeds.dtype)
    return mx.where(mask[..., None], rows, inputs_embeds)


def merge_image_features(
    input_ids: mx.array, inputs_embeds: mx.array, image_features: mx.array, image_token_id: int
) -> mx.array:
    """Replace, in order, every `image_token_id` position of `inputs_embeds` `[B, L, D]` by a row of
    `image_features` (`[P, n, D]` or `[P*n, D]`, tile-major). The counts must match exactly."""
    index, mask = image_positions(input_ids, image_token_id)
    n_tokens = int(mask.sum().item())
    n_rows = image_features.size // inputs_embeds.shape[-1]
    if n_tokens != n_rows:
        raise UserError(f"Image features and image tokens do not match: tokens: {n_tokens}, features {n_rows}")
    if n_tokens == 0:
        return inputs_embeds
    return scatter_image_features(inputs_embeds, image_features, index, mask)


@dataclass
class EncodedRequest:
    """A request's token ids and image features as the LLM takes them. With the Flash router on, `compress[t]`
    says whether tile t was compressed (its score is `p0[t]`) and `ids` has the compressed tiles' surplus image
    tokens dropped; otherwise both are None."""

    ids: List[int]
    features: Optional[mx.array]
    compress: Optional[np.ndarray] = None
    p0: Optional[np.ndarray] = None


class InternVLChatModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_model = InternVisionModel(config.vision_config)
        ratio = round(1 / config.downsample_ratio)
        self.mlp1 = Projector(config.vision_config.hidden_size * ratio * ratio, config.llm_config["hidden_size"])
        self.language_model = build_language_model(config.llm_config)
        if config.is_flash:
            c, d = config.vision_config.hidden_size, config.llm_config["hidden_size"]
            self.pooling_before_gating = CrossAttentionPooling(c)
            self.gating = Gating(c)
            self.mlp2 = LowResProjector(c * ratio**4, d)

    @property
    def image_token_id(self) -> Optional[int]:
        """The `<IMG_CONTEXT>` id, settled in the config when the checkpoint is read."""
        return self.config.image_token_id

    @property
    def source_path(self) -> Optional[Path]:
        """The directory the weights were loaded from (its tokenizer files go with the model on export)."""
        return Path(self.config.source_path) if self.config.source_path else None

    @property
    def layers(self):
        """The LLM decoder layers (mlx-lm's cache and LoRA helpers look here)."""
        return self.language_model.layers

    def vision_features(self, pixel_values: mx.array) -> mx.array:
        """`[P, S, S, 3]` tiles -> `[P, 1 + (S/p)^2, C]` ViT hidden states at `select_layer` (CLS first)."""
        return self.vision_model(pixel_values, self.config.select_layer)

    def project_features(self, vit_hidden: mx.array, grid_hw: Optional[tuple] = None) -> mx.array:
        """ViT hidden states (CLS first) -> `[P, n, D]` LLM-space image tokens (pixel shuffle + mlp1)."""
        h = vit_hidden[:, 1:]
        p, n, c = h.shape
        gh, gw = grid_hw or (int(round(n**0.5)),) * 2
        h = pixel_shuffle(h.reshape(p, gh, gw, c), self.config.downsample_ratio, self.config.ps_version)
        return self.mlp1(h)

    def extract_feature(self, pixel_values: mx.array) -> mx.array:
        """`[P, S, S, 3]` normalized tiles -> `[P, num_image_token, D]` image embeddings."""
        patch = self.config.vision_config.patch_size
        grid = (pixel_values.shape[1] // patch, pixel_values.shape[2] // patch)
        return self.project_features(self.vision_features(pixel_values), grid)

    def flash_tiles(self, pixel_values: mx.array) -> FlashTiles:
        """`[P, S, S, 3]` tiles -> both projections and the router's `p0` (upstream `extract_feature_flash`, which
        takes the ViT's last layer)."""
        return self.flash_stages(pixel_values)[0]

    def flash_stages(self, pixel_values: mx.array) -> Tuple[FlashTiles, mx.array]:
        """`flash_tiles` and the pooled vector per tile `[P, C]` that the gate scored."""
        h = self.vision_model(pixel_values, -1)[:, 1:]
        pooled = self.pooling_before_gating(h)
        p0 = self.gating(pooled)[:, 0]
        low, full = self.flash_projections(h)
        mx.eval(pooled, p0, low, full)
        return FlashTiles(np.array(p0, dtype=np.float32), low, full), pooled

    def flash_projections(self, h: mx.array) -> Tuple[mx.array, mx.array]:
        """The ViT's last-layer patch features `[P, N, C]` (CLS dropped) -> (mlp2 rows `[P, n/4, D]`, mlp1 rows
        `[P, n, D]`), as the router's two branches project them."""
        p, n, c = h.shape
        g = int(round(n**0.5))
        grid = h.reshape(p, g, g, c)
        r, version = self.config.downsample_ratio, self.config.ps_version
        return self.mlp2(pixel_shuffle(grid, r * r, version)), self.mlp1(pixel_shuffle(grid, r, version))

    def use_flash(self, flash: Optional[bool] = None) -> bool:
        """Whether the router runs: `flash` None follows the checkpoint's `flash_mode`; True needs a Flash model."""
        if flash and not self.config.is_flash:
            raise UserError("--flash / flash=True needs an InternVL3.5-Flash checkpoint (flash_mode in its "
                            "config.json, with the gating and mlp2 weights); this model has no router")
        return self.config.is_flash and bool(self.config.flash_mode if flash is None else flash)

    def route_ids(self, ids: Sequence[int], p0: np.ndarray) -> Tuple[np.ndarray, List[int]]:
        """(the router's decision per tile over a request's scores `p0`, `ids` rendered with full tiles shortened
        to match)."""
        cfg = self.config
        compress = route(p0, cfg.flash_relative_threshold, cfg.flash_absolute_threshold)
        return compress, compress_ids(ids, self.image_token_id, compress, cfg.num_image_token, cfg.flash_image_token)

    def route_tiles(self, ids: Sequence[int], tiles: FlashTiles) -> EncodedRequest:
        """Decide per tile over the whole request, and shorten `ids` (rendered with full tiles) to match."""
        compress, new_ids = self.route_ids(ids, tiles.p0)
        return EncodedRequest(new_ids, select_features(tiles, compress), compress, tiles.p0)

    def encode_request(self, ids: Sequence[int], pixel_values: Optional[mx.array],
                       flash: Optional[bool] = None) -> EncodedRequest:
        """The ids and image features of one request (its prompt rendered with `num_image_token` per tile)."""
        if pixel_values is None:
            return EncodedRequest(list(ids), None)
        if not self.use_flash(flash):
            return EncodedRequest(list(ids), self.extract_feature(pixel_values))
        return self.route_tiles(ids, self.flash_tiles(pixel_values))

    def embed_tokens(self, input_ids: mx.array) -> mx.array:
        return embedding_layer(self.language_model)(input_ids)

    def get_input_embeddings(
        self,
        input_ids: mx.array,
        pixel_values: Optional[mx.array] = None,
        image_features: Optional[mx.array] = None,
    ) -> mx.array:
        """Token embeddings `[B, L, D]` with image features merged at the `<IMG_CONTEXT>` positions."""
        embeds = self.embed_tokens(input_ids)
        if image_features is None and pixel_values is not None:
            image_features = self.extract_feature(pixel_values)
        if image_features is None:
            return embeds
        if self.image_token_id is None:
            raise UserError("the model config has no image_token_id; set ModelConfig.image_token_id to the "
                            "tokenizer's <IMG_CONTEXT> id")
        return merge_image_features(input_ids, embeds, image_features, self.image_token_id)

    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: Optional[mx.array] = None,
        cache: Optional[list] = None,
        image_features: Optional[mx.array] = None,
        input_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        """Logits `[B, L, V]`. Pass `pixel_values` (or precomputed `image_features`) on the prefill step only."""
        if input_embeddings is None and pixel_values is None and image_features is None:
            # Text-only steps (every decode step) take the backbone's own path: no per-token cost over mlx-lm.
            return self.language_model(input_ids, cache=cache)
        if input_embeddings is None:
            input_embeddings = self.get_input_embeddings(input_ids, pixel_values, image_features)
        return forward_embeddings(self.language_model, input_embeddings, cache)

    def make_cache(self):
        return make_prompt_cache(self.language_model)

    def prefill(self, input_ids, image_features: Optional[mx.array], cache, step: int = 2048):
        """Run `input_ids` (a list; image features at its image tokens) into `cache` in chunks of `step` tokens;
        yields the number of tokens done so far."""
        ids = mx.array(input_ids, dtype=mx.int32)[None]
        embeds = self.get_input_embeddings(ids, image_features=image_features)
        for start in range(0, ids.shape[1], step):
            self(ids[:, start:start + step], cache=cache, input_embeddings=embeds[:, start:start + step])
            mx.eval([c.state for c in cache])
            yield min(start + step, ids.shape[1])

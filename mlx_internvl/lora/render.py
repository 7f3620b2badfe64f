"""LoRA samples -> token ids + per-token loss mask, through the renderer inference uses (`mlx_internvl.render`).

- The conversation is rendered by `Processor.renderer` with `loss_mask=True`: the prompt part of a sample is token
  for token what generation feeds, and the mask covers each answer and its stop token.
- Truncation to `max_length` never cuts inside an image: a sample whose last `</img>` does not fit is refused.
- Tile counts come from image headers (no decoding), with upstream training's rule of `max_tiles // n_images`
  tiles per image for multi-image samples; pixels are loaded only when a batch needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from ..processing import add_image_placeholders, image_to_tiles, tile_count
from ..tokenizer import IMG_CONTEXT, IMG_END, IMG_START
from .data import BadLine, Sample, image_size, open_image_ref


@dataclass
class Encoded:
    """A rendered sample. `mask[t]` is True where token `ids[t]` is learned (predicted from `ids[:t]`)."""

    ids: np.ndarray  # int32 [L]
    mask: np.ndarray  # bool [L]
    images: List[str]
    num_tiles: List[int]
    tiles_budget: int  # max tiles per image used for this sample
    where: str
    truncated: bool = False

    @property
    def num_loss_tokens(self) -> int:
        return int(self.mask.sum())


def tiles_per_image(sample: Sample, config, max_tiles: Optional[int]) -> Tuple[int, List[int]]:
    """(per-image tile budget, tile count of each image) without decoding the images."""
    base = sample.max_tiles or max_tiles or config.max_dynamic_patch
    budget = max(1, base // max(1, len(sample.images)))
    return budget, [tile_count(*image_size(ref), config, budget) for ref in sample.images]


def encode_sample(sample: Sample, processor, max_tiles: Optional[int] = None,
                  max_length: Optional[int] = None) -> Encoded:
    """Render and tokenize one sample (raises BadLine with the reason when it cannot be used)."""
    for _, text in sample.messages:
        for marker in (IMG_START, IMG_END, IMG_CONTEXT):
            if marker in text:
                raise BadLine(f"the text contains the reserved token {marker}; write <image> where an image goes")
    budget, num_tiles = tiles_per_image(sample, processor.config, max_tiles)
    messages = list(sample.messages)
    if sample.images and not any("<image>" in text for _, text in messages):
        messages[0] = (messages[0][0], add_image_placeholders(messages[0][1], len(sample.images)))
    rendered = processor.renderer.render(messages, num_tiles, sample.system, loss_mask=True)
    ids, mask = np.asarray(rendered.ids, dtype=np.int32), rendered.loss_mask
    truncated = False
    if max_length is not None and len(ids) > max_length:
        end = rendered.image_spans[-1][1] if rendered.image_spans else -1  # the position of the last </img>
        if end >= max_length:
            raise BadLine(f"its images end at token {end + 1}, past --max-length {max_length}; raise "
                          "--max-length or lower --max-tiles (images are never cut)")
        ids, mask, truncated = ids[:max_length], mask[:max_length], True
    if not mask[1:].any():
        why = f" after truncation to --max-length {max_length}" if truncated else ""
        raise BadLine(f"no answer token is left to learn from{why}")
    return Encoded(ids, mask, list(sample.images), num_tiles, budget, sample.where, truncated)


def load_pixels(enc: Encoded, config) -> Optional[np.ndarray]:
    """`[T, S, S, 3]` float32 normalized tiles of all the sample's images, in order (None without images)."""
    if not enc.images:
        return None
    tiles = []
    for ref, n in zip(enc.images, enc.num_tiles):
        t = image_to_tiles(open_image_ref(ref), config, enc.tiles_budget)
        if t.shape[0] != n:
            raise BadLine(f"image {ref} gave {t.shape[0]} tiles, its header said {n}; was the file changed?")
        tiles.append(t)
    return np.concatenate(tiles)

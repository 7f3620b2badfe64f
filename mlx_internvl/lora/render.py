"""Conversation -> token ids + per-token loss mask, rendered exactly as inference renders the same prompt.

- The text is the checkpoint template's (system block, then `role + message + sep` per message), with each
  `<image>` expanded to `<img><IMG_CONTEXT>*n</img>` for its tile count, and tokenized in one piece with the same
  `tokenizer.encode` the `Processor` uses, so the prompt part of a sample is token-for-token what generation feeds.
- The loss covers each assistant message and the stop token that ends it (`<|im_end|>`, `<|end|>`), not the role
  header and not the newline the internvl2_5 template puts after the stop token: the tokens upstream's
  `preprocess_internvl2_5` / `preprocess_mpt` / `preprocess_phi3` leave unmasked. Span boundaries are found by
  tokenizing the text up to each boundary and taking the common prefix with the full ids, which works for BPE and
  sentencepiece tokenizers alike (a token straddling the start of an answer counts as answer).
- Truncation to `max_length` never cuts inside an image: a sample whose last `</img>` does not fit is refused.
- Tile counts come from image headers (no decoding), with upstream training's rule of `max_tiles // n_images`
  tiles per image for multi-image samples; pixels are loaded only when a batch needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from ..processing import IMG_CONTEXT, IMG_END, IMG_START, add_image_placeholders, image_to_tiles, tile_grid
from .data import ASSISTANT, USER, BadLine, Sample, image_size, open_image_ref


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
    counts = []
    for ref in sample.images:
        if not config.dynamic_image_size:
            counts.append(1)
            continue
        w, h = image_size(ref)
        cols, rows = tile_grid(w, h, min(config.min_dynamic_patch, budget), budget, config.force_image_size)
        n = cols * rows
        counts.append(n + 1 if config.use_thumbnail and n != 1 else n)
    return budget, counts


def conversation_text(sample: Sample, template, system_message: Optional[str], num_tiles: List[int],
                      tokens_per_tile: int) -> Tuple[str, List[Tuple[int, int]]]:
    """The rendered conversation and the (start, end) character spans of each answer + its stop token."""
    stop = template.stop_str
    if not template.sep.startswith(stop):
        raise ValueError(f"template {template.name}: separator {template.sep!r} does not start with {stop!r}")
    messages = [list(m) for m in sample.messages]
    if sample.images and not any("<image>" in text for _, text in messages):
        messages[0][1] = add_image_placeholders(messages[0][1], len(sample.images))
    system = sample.system if sample.system is not None else system_message
    if system is None:
        system = template.system_message
    out = template.system_template.format(system_message=system) + template.sep
    spans, k = [], 0
    for role, text in messages:
        if role == USER:
            while "<image>" in text:
                text = text.replace("<image>", IMG_START + IMG_CONTEXT * (tokens_per_tile * num_tiles[k]) + IMG_END, 1)
                k += 1
        out += template.roles[role]
        if role == ASSISTANT:
            spans.append((len(out), len(out) + len(text) + len(stop)))
        out += text + template.sep
    return out, spans


def _common_prefix(a: np.ndarray, b: List[int]) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != np.asarray(b[:n], dtype=a.dtype))[0]
    return int(diff[0]) if len(diff) else n


def encode_sample(sample: Sample, processor, max_tiles: Optional[int] = None,
                  max_length: Optional[int] = None) -> Encoded:
    """Render and tokenize one sample (raises BadLine with the reason when it cannot be used)."""
    config, tok = processor.config, processor.tokenizer
    for _, text in sample.messages:
        for marker in (IMG_START, IMG_END, IMG_CONTEXT):
            if marker in text:
                raise BadLine(f"the text contains the reserved token {marker}; write <image> where an image goes")
    budget, num_tiles = tiles_per_image(sample, config, max_tiles)
    text, spans = conversation_text(sample, processor.template, config.system_message, num_tiles,
                                    config.num_image_token)
    ids = np.asarray(tok.encode(text), dtype=np.int32)
    mask = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        a = _common_prefix(ids, tok.encode(text[:start]))
        b = _common_prefix(ids, tok.encode(text[:end]))
        mask[a:b] = True
    expected = sum(num_tiles) * config.num_image_token
    found = int((ids == processor.image_token_id).sum())
    if found != expected:
        raise BadLine(f"tokenized to {found} image tokens, expected {expected}; does the tokenizer split "
                      f"{IMG_CONTEXT}?")
    truncated = False
    if max_length is not None and len(ids) > max_length:
        end_id = tok.convert_tokens_to_ids(IMG_END)
        ends = np.nonzero(ids == end_id)[0]
        if len(ends) and ends[-1] >= max_length:
            raise BadLine(f"its images end at token {ends[-1] + 1}, past --max-length {max_length}; raise "
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

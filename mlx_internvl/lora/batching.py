"""Encoded samples -> padded microbatches, in an order that is a pure function of (seed, position).

Samples are sorted by their padded length and cut into microbatches of `batch_size` neighbours (little padding,
as mlx-lm's `iterate_batches` does); samples of the same padded length are shuffled among themselves first (with
`seed`), so a microbatch is not a run of one answer class when answers are short and alike. Each epoch visits
those microbatches in a permutation drawn from `seed + epoch`. So the k-th microbatch of a run is known from k
alone: resuming needs only the count of microbatches consumed, and several processes agree on the stream without
talking to each other.

A microbatch carries, besides ids and the loss mask, the image positions of `model.image_positions` (which feature
row each `<IMG_CONTEXT>` position takes) so that the merge needs no host round-trip inside a compiled step.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..model import image_positions
from .data import BadLine, Dataset
from .render import Encoded, encode_sample, load_pixels

PAD_TO = 32


class Batcher:
    def __init__(self, samples: List[Encoded], batch_size: int, config, pad_id: int, image_token_id: int,
                 seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        if not samples:
            raise UserError("no usable samples to make batches from")
        self.samples = samples
        self.config = config
        self.pad_id = pad_id
        self.image_token_id = image_token_id
        self.seed = seed
        self.shuffle = shuffle
        # Sorted by padded length; samples that pad to the same length are shuffled among themselves, so that
        # neighbours of equal length (short answers, often one class) do not always share a microbatch.
        tie = np.random.default_rng(seed).permutation(len(samples)) if shuffle else np.arange(len(samples))
        order = sorted(range(len(samples)), key=lambda i: (-(-len(samples[i].ids) // PAD_TO), int(tie[i])))
        self.batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.batches))
        return np.random.default_rng(self.seed + epoch).permutation(len(self.batches))

    def indices(self, k: int) -> List[int]:
        """Sample indices of the k-th microbatch of the (endless) stream."""
        epoch, pos = divmod(k, len(self.batches))
        return self.batches[int(self.epoch_order(epoch)[pos])]

    def loss_tokens(self, k: int) -> int:
        return sum(int(self.samples[i].mask[1:].sum()) for i in self.indices(k))

    def batch(self, k: int) -> Tuple[Dict[str, mx.array], int]:
        """(arrays for the k-th microbatch, its count of non-padding tokens)."""
        return collate([self.samples[i] for i in self.indices(k)], self.config, self.pad_id, self.image_token_id)


def collate(samples: List[Encoded], config, pad_id: int, image_token_id: int) -> Tuple[Dict[str, mx.array], int]:
    """Right-pad to a multiple of PAD_TO. Returns `{'ids' [B, L] int32, 'mask' [B, L] float32, and with images
    'pixel_values' [T, S, S, 3], 'image_index' [B, L] int32, 'image_mask' [B, L] bool}` and the token count."""
    longest = max(len(s.ids) for s in samples)
    length = -(-longest // PAD_TO) * PAD_TO
    ids = np.full((len(samples), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(samples), length), dtype=np.float32)
    for row, s in enumerate(samples):
        ids[row, : len(s.ids)] = s.ids
        mask[row, : len(s.ids)] = s.mask
    out = {"ids": mx.array(ids), "mask": mx.array(mask)}
    tiles = [t for t in (load_pixels(s, config) for s in samples) if t is not None]
    if tiles:
        index, is_image = image_positions(out["ids"], image_token_id)  # padding is never an image token
        out.update(pixel_values=mx.array(np.concatenate(tiles)), image_index=index, image_mask=is_image)
    return out, int(sum(len(s.ids) for s in samples))


def val_batches(batcher: Optional[Batcher], limit: int) -> List[int]:
    if batcher is None:
        return []
    n = len(batcher) if limit is None or limit < 0 else min(limit, len(batcher))
    return list(range(n))


def encode_dataset(data: Dataset, processor, args, encode=encode_sample):
    """(encoded samples, problems, number truncated) with `args.max_tiles` / `args.max_length`; a bad sample becomes
    a 'file:line: why' problem. `encode(sample, processor, max_tiles, max_length)`: SFT's `encode_sample` or the
    preference pairs' `encode_pair`."""
    encoded, problems = [], list(data.problems)
    for s in data.samples:
        try:
            encoded.append(encode(s, processor, args.max_tiles, args.max_length))
        except (BadLine, UserError) as e:
            problems.append(f"{s.where}: {e}")
    return encoded, problems, sum(e.truncated for e in encoded)


def report_problems(what: str, problems: List[str], encoded, skip_bad: bool, say) -> None:
    """Refuse bad samples (all of them listed, up to 30) unless `skip_bad`; refuse always when none is usable."""
    if not problems:
        return
    shown = "\n  ".join(problems[:30]) + (f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else "")
    if not encoded:
        raise UserError(f"{what}: no usable sample; {len(problems)} problem(s):\n  {shown}")
    if not skip_bad:
        raise UserError(f"{what}: {len(problems)} bad sample(s):\n  {shown}\nFix them, or pass --skip-bad to "
                        "train on the rest.")
    say(f"{what}: skipping {len(problems)} bad sample(s):\n  {shown}")


def pad_id(processor) -> int:
    pad = getattr(processor.tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else int(processor.eos_token_id)

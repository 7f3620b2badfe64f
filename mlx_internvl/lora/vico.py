"""ViCO (Visual Consistency Learning): the two stages by which InternVL3.5-Flash learns to route, as the InternVL3.5
report and the ViCO paper describe them. The released Flash code has no training path (its `forward` never calls
the router), so the recipe here is the papers', in the LoRA trainer.

- Consistency (`--train-flash mlp2`): each tile of a sample is, with probability 1/2, projected by `mlp2` (64 tokens;
  its surplus `<IMG_CONTEXT>` positions are dropped from the prompt, as routing drops them) and otherwise by `mlp1`
  (256). The loss per answer token is KL(reference || model) between the next-token distributions; the reference is
  the same model at full resolution with its adapters switched off (the checkpoint as released, frozen; no second
  copy of the weights). `mlp2` trains in full beside the LoRA adapters. The draws are a function of (seed,
  microbatch), so a resumed run makes the same ones.
- Router (`--train-flash router`): the model is frozen and only the router (its pooling and gating network) learns.
  For each tile i, `r_i = NLL(answer | tile i through mlp2, the others through mlp1) / NLL(answer | every tile through
  mlp1)`: what compressing that tile alone costs the answer. Below the `flash_percentile`-th percentile of the last
  `flash_window` ratios (a sliding window, this microbatch's included) the tile is labelled "compress" (the gate's
  class 0, whose probability is inference's `p0`), otherwise "keep"; the loss is the cross-entropy of the gate's
  two-way softmax against the label, summed over tiles. The window lives in the optimizer state, so checkpoints keep
  it and a resumed run labels as the uninterrupted one would.

Tiles are projected from the ViT's last layer, as the router's inference path (`flash_stages`) projects them.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..backbones import forward_embeddings
from ..errors import UserError
from ..model import image_positions, scatter_image_features
from .batching import PAD_TO, Batcher
from .forward import training_logits
from .preference import adapters_off

WINDOW_KEY = "flash_router_window"  # optimizer-state entry: [ratios of the window..., count seen]


class FlashBatcher(Batcher):
    """SFT's microbatches (same order, same padding) plus what the ViCO stage `mode` needs: the consistency stage's
    compressed prompt, or the router stage's labels (`labeler`, set once the model and optimizer state exist)."""

    def __init__(self, samples, batch_size, config, pad_id, image_token_id, seed=0, shuffle=True, mode="mlp2"):
        if mode == "router":
            samples = [s for s in samples if s.images]
            if not samples:
                raise UserError("--train-flash router learns from the tiles of images; no sample has an image")
        super().__init__(samples, batch_size, config, pad_id, image_token_id, seed=seed, shuffle=shuffle)
        self.mode, self.labeler = mode, None

    def loss_tokens(self, k: int) -> int:
        """What the step's loss is summed over: answer tokens, or for the router stage tiles."""
        if self.mode == "router":
            return sum(sum(self.samples[i].num_tiles) for i in self.indices(k))
        return super().loss_tokens(k)

    def batch(self, k: int):
        batch, n = super().batch(k)
        samples = [self.samples[i] for i in self.indices(k)]
        if self.mode == "router":
            batch.update(self.labeler(samples, batch))
            return batch, n
        rng = np.random.default_rng([self.seed, k, 0x5C0])
        rows, first = [], 0
        for s in samples:
            tiles = sum(s.num_tiles) if s.images else 0
            rows.append((s.ids, s.mask, first, list(rng.random(tiles) < 0.5)))
            first += tiles
        batch.update(view_rows(rows, self.config, first, self.pad_id, self.image_token_id))
        batch["answer_full"], _ = _pad([np.flatnonzero(s.mask[1:]) for s in samples])
        return batch, n


def view_rows(rows: Sequence[tuple], config, n_tiles: int, pad_id: int, image_token_id: int) -> Dict[str, mx.array]:
    """Prompts with some tiles compressed, as arrays for one forward pass (`view_*`, `answer_*`).

    `rows`: `(ids [L], mask [L], index of the row's first tile in the microbatch, compress flag per tile)`. Returns
    the ids padded to a multiple of `PAD_TO`, `view_rows` (the row of `concat(mlp1 rows [T*n], mlp2 rows [T*n/4])`
    each image token takes, in order), the merge's `view_index`/`view_mask`, and `answer_pos` `[R, A]` (the logit
    position that predicts each answer token) with `answer_w` (1 for an answer token, 0 for padding)."""
    per_tile, kept = config.num_image_token, config.flash_image_token
    kept_ids, feature_rows, answers = [], [], []
    for ids, mask, first, compress in rows:
        img = np.flatnonzero(ids == image_token_id)
        if len(img) != per_tile * len(compress):
            raise ValueError(f"a row holds {len(img)} image tokens; {len(compress)} tiles need "
                             f"{per_tile * len(compress)}")
        order = np.arange(len(img))
        keep = np.ones(len(ids), dtype=bool)
        keep[img[np.asarray(compress, dtype=bool)[order // per_tile] & (order % per_tile >= kept)]] = False
        kept_ids.append(ids[keep])
        answers.append(np.flatnonzero(mask[keep][1:]))  # logit position p predicts token p + 1
        for j, c in enumerate(compress):
            t = first + j
            feature_rows.append(n_tiles * per_tile + t * kept + np.arange(kept) if c
                                else t * per_tile + np.arange(per_tile))
    length = -(-max(len(i) for i in kept_ids) // PAD_TO) * PAD_TO
    out_ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    for r, i in enumerate(kept_ids):
        out_ids[r, : len(i)] = i
    view = {"view_ids": mx.array(out_ids)}
    view["view_index"], view["view_mask"] = image_positions(view["view_ids"], image_token_id)
    if feature_rows:
        view["view_rows"] = mx.array(np.concatenate(feature_rows).astype(np.int32))
    view["answer_pos"], view["answer_w"] = _pad(answers)
    return view


def _pad(positions: List[np.ndarray]) -> Tuple[mx.array, mx.array]:
    width = max(1, max(len(p) for p in positions))
    pos, w = np.zeros((len(positions), width), dtype=np.int32), np.zeros((len(positions), width), dtype=np.float32)
    for r, p in enumerate(positions):
        pos[r, : len(p)], w[r, : len(p)] = p, 1.0
    return mx.array(pos), mx.array(w)


def _at(logits: mx.array, pos: mx.array) -> mx.array:
    """`logits` `[B, L, V]` at positions `pos` `[B, A]` -> `[B, A, V]`."""
    b, length, v = logits.shape
    flat = (mx.arange(b)[:, None] * length + pos).reshape(-1)
    return logits.reshape(-1, v)[flat].reshape(pos.shape[0], pos.shape[1], v)


def patch_features(model, pixel_values: mx.array) -> mx.array:
    """The ViT's last-layer patch features `[T, N, C]` (CLS dropped), as the router reads them."""
    dtype = model.vision_model.embeddings.patch_embedding.weight.dtype
    return model.vision_model(pixel_values.astype(dtype), -1)[:, 1:]


def feature_table(model, patches) -> mx.array:
    """`concat(mlp1 rows [T*n, D], mlp2 rows [T*n/4, D])` of the tiles' patch features (what `view_rows` indexes)."""
    low, full = model.flash_projections(patches)
    d = full.shape[-1]
    return mx.concatenate([full.reshape(-1, d), low.reshape(-1, d)])


def routed_logits(model, batch: dict, table) -> mx.array:
    """Logits `[R, L, V]` of the `view_*` prompts, each tile's rows taken from `table` (`feature_table`) as the view
    says."""
    embeds = model.embed_tokens(batch["view_ids"])
    if table is not None:
        embeds = scatter_image_features(embeds, table[batch["view_rows"]], batch["view_index"], batch["view_mask"])
    return forward_embeddings(model.language_model, embeds)


def _reference_logits(model, batch: dict, table, frozen_features: bool) -> mx.array:
    """The full-resolution logits of the model with its adapters off. With the ViT and mlp1 frozen (no adapters
    there) and the router's ViT layer the one training reads, the full-resolution rows are the first part of
    `table`: no second ViT pass."""
    shared = table is not None and frozen_features and model.config.select_layer == -1
    with adapters_off(model):
        if not shared:
            return mx.stop_gradient(training_logits(model, batch, True))
        embeds = model.embed_tokens(batch["ids"])
        embeds = scatter_image_features(embeds, table, batch["image_index"], batch["image_mask"])
        return mx.stop_gradient(forward_embeddings(model.language_model, embeds))


def consistency_loss_sum(model, batch: dict, frozen_features: bool = True):
    """(summed KL(full-resolution reference || model on the compressed prompt) over answer tokens, their count)."""
    table = None
    if "pixel_values" in batch:
        patches = patch_features(model, batch["pixel_values"])
        table = feature_table(model, mx.stop_gradient(patches) if frozen_features else patches)
    ref = _reference_logits(model, batch, table, frozen_features)
    logits = routed_logits(model, batch, table)
    ref_lp = nn.log_softmax(_at(ref, batch["answer_full"]).astype(mx.float32), axis=-1)
    lp = nn.log_softmax(_at(logits, batch["answer_pos"]).astype(mx.float32), axis=-1)
    w = batch["answer_w"]
    kl = (mx.exp(ref_lp) * (ref_lp - lp)).sum(-1) * w
    return kl.sum(), w.sum()


def router_loss_sum(model, batch: dict, frozen_features: bool = True):
    """(summed cross-entropy of the gate against the tiles' labels, number of tiles)."""
    probs = model.gating(model.pooling_before_gating(batch["router_patches"]))
    labels = batch["router_labels"]
    picked = mx.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
    return -mx.log(mx.maximum(picked, 1e-30)).sum(), mx.array(labels.shape[0], dtype=mx.float32)


def answer_nll(model, batch: dict, table) -> List[float]:
    """The summed negative log-likelihood of each `view_*` row's answer tokens, one row at a time, each cut after
    its last answer token (the memory of one training row)."""
    out, mask = [], np.array(batch["view_mask"])
    for r in range(batch["view_ids"].shape[0]):
        end = int(np.array(batch["answer_pos"][r]).max()) + 2
        before, count = int(mask[:r].sum()), int(mask[r].sum())
        row = {"view_ids": batch["view_ids"][r: r + 1, :end], "view_mask": batch["view_mask"][r: r + 1, :end],
               "view_index": mx.maximum(batch["view_index"][r: r + 1, :end] - before, 0),
               "view_rows": batch["view_rows"][before: before + count] if count else None}
        pos, w = batch["answer_pos"][r: r + 1], batch["answer_w"][r: r + 1]
        logits = _at(routed_logits(model, row, table if count else None), pos).astype(mx.float32)
        targets = mx.take(row["view_ids"][0], pos[0] + 1)[None]
        out.append(float((nn.losses.cross_entropy(logits, targets) * w).sum().item()))
    return out


class RouterLabeler:
    """The router stage's label per tile of a microbatch, from the frozen model's answer losses (module doc)."""

    def __init__(self, model, optimizer, percentile: float, window: int):
        self.model, self.optimizer, self.percentile, self.window = model, optimizer, percentile, window
        if WINDOW_KEY not in optimizer.state:  # a resumed run brings its window back with the optimizer state
            optimizer.state[WINDOW_KEY] = mx.array(np.r_[np.full(window, np.nan), 0.0].astype(np.float32))

    def ratios(self, batcher, samples, batch) -> Tuple[np.ndarray, mx.array]:
        """(r_i per tile of the microbatch, the tiles' patch features)."""
        patches = patch_features(self.model, batch["pixel_values"])
        rows, first, sizes = [], 0, []
        for s in samples:
            n = sum(s.num_tiles)
            rows += [(s.ids, s.mask, first, [False] * n)] + [(s.ids, s.mask, first, [j == i for j in range(n)])
                                                             for i in range(n)]
            first, sizes = first + n, sizes + [n]
        view = view_rows(rows, batcher.config, first, batcher.pad_id, batcher.image_token_id)
        table = feature_table(self.model, patches)
        mx.eval(table)  # projected once, read by every row below
        nll = answer_nll(self.model, view, table)
        out, k = [], 0
        for n in sizes:
            out += [(nll[k + 1 + i] + 1e-6) / (nll[k] + 1e-6) for i in range(n)]
            k += 1 + n
        return np.array(out, dtype=np.float32).astype(np.float64), patches  # as the window holds them

    def __call__(self, batcher, samples, batch, update: bool = True) -> dict:
        ratios, patches = self.ratios(batcher, samples, batch)
        held = np.array(self.optimizer.state[WINDOW_KEY], dtype=np.float64)
        ring, seen = held[:-1], int(held[-1])
        past = ring[~np.isnan(ring)]
        tau = np.percentile(np.concatenate([past, ratios]), self.percentile)
        labels = np.where(ratios < tau, 0, 1).astype(np.int32)  # 0: compress (the gate's p0), 1: keep
        if update:
            take = ratios[-self.window:]
            ring[(seen + len(ratios) - len(take) + np.arange(len(take))) % self.window] = take
            self.optimizer.state[WINDOW_KEY] = mx.array(np.r_[ring, seen + len(ratios)].astype(np.float32))
        return {"router_patches": mx.stop_gradient(patches), "router_labels": mx.array(labels)}


def setup_flash(run, lora) -> Optional[Callable]:
    """Check a ViCO stage against the run, give its batchers what they need; returns the stage's loss function."""
    mode = lora.train_flash
    if mode and run.preference is not None:
        raise UserError("--train-flash is a training objective of its own (ViCO); it does not combine with a "
                        "preference --train-mode")
    if mode != run.batcher_mode:
        raise UserError(f"--resume: {run.out} was started with --train-flash {mode or '(none)'}; resume it with "
                        "the same option")
    if mode is None:
        return None
    if mode == "mlp2":
        if lora.train_projector == "full":
            raise UserError("--train-flash mlp2 compares the model with the checkpoint as released (its adapters "
                            "off); --train-projector full would change that reference. Use --train-projector lora")
        return consistency_loss_sum
    if run.world > 1:
        raise UserError("--train-flash router runs in one process: its labels come from a window of the ratios seen "
                        "so far, which processes would each see differently")
    labeler = RouterLabeler(run.model, run.optimizer, run.args.flash_percentile, run.args.flash_window)
    run.batcher.labeler = lambda *a: labeler(run.batcher, *a)
    if run.val_batcher is not None:
        run.val_batcher.labeler = lambda *a: labeler(run.val_batcher, *a, update=False)
    return router_loss_sum

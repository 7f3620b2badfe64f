"""Where a DPO/MPO run's reference log-probs come from.

- `LiveReference`: a forward pass per microbatch, without gradient, of the policy with its adapters switched off
  (`preference.adapters_off`, no second copy of the weights) or of another checkpoint (`--reference-model`,
  loaded once, frozen, its tokenizer and image-token layout checked against the policy's up front).
- `StoredReference` (`--precompute-ref-logps`): every pair's chosen and rejected log-probs, computed once before
  the first step by the live reference on the very microbatches training and validation cut (same rows, same
  padding, so the values are the ones the live reference gives), and kept in `reference_logps.safetensors` in the
  adapter directory. The file records a SHA-256 of the encoded pairs (token ids, loss masks, tiles, image contents)
  and of the reference's weights. A resume whose data or reference differs from what the file was computed for is
  refused (the steps already taken used the old values); a fresh start recomputes it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Dict, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import UserError
from ..files import atomic_write
from .forward import training_logits
from .pref_step import reference_logps
from .preference import adapters_off, sequence_logps

REF_FILE = "reference_logps.safetensors"


class LiveReference:
    """The reference forward for each microbatch: the policy with adapters off, or `other` (a frozen model)."""

    def __init__(self, model, frozen: bool, other=None):
        self.model, self.frozen, self.other = model, frozen, other

    def logps(self, split: str, k: int, batch: dict) -> mx.array:
        if self.other is None:
            return reference_logps(self.model, batch, training_logits, self.frozen)
        return mx.stop_gradient(sequence_logps(training_logits(self.other, batch, True), batch)[0])

    def weights(self) -> dict:
        if self.other is not None:
            return dict(tree_flatten(self.other.parameters()))
        with adapters_off(self.model):
            return dict(tree_flatten(self.model.parameters()))


class StoredReference:
    """Log-probs looked up by pair: `tables[split] = (chosen [N], rejected [N])` in the batcher's sample order."""

    def __init__(self, tables: Dict[str, tuple], batchers: dict):
        self.tables, self.batchers = tables, batchers

    def logps(self, split: str, k: int, batch: dict) -> mx.array:
        idx = self.batchers[split].indices(k)
        chosen, rejected = self.tables[split]
        return mx.array(np.concatenate([chosen[idx], rejected[idx]]))


def check_same_layout(policy, reference, where: str) -> None:
    """Refuse a reference checkpoint whose tokens or image tokens would not line up with the policy's."""
    pc, rc = policy.config, reference.config
    checks = {
        "tokenizer vocabulary": (policy.tokenizer.get_vocab(), reference.tokenizer.get_vocab()),
        "image token id": (policy.image_token_id, reference.image_token_id),
        "image tokens per tile": (pc.num_image_token, rc.num_image_token),
        "tile size": (pc.force_image_size, rc.force_image_size),
        "chat template": (policy.template.name, reference.template.name),
    }
    diff = [f"{name}: {_short(a)} (model) vs {_short(b)} (reference)" for name, (a, b) in checks.items() if a != b]
    if diff:
        raise UserError(f"--reference-model {where}: its tokens do not line up with the model's, so its log-probs "
                        f"of the same answers cannot be compared ({'; '.join(diff)}). Use a checkpoint of the same "
                        "family (same tokenizer and image-token layout).")


def _short(value) -> str:
    return f"{len(value)} entries" if isinstance(value, dict) else repr(value)


def data_fingerprint(pairs) -> str:
    h = hashlib.sha256()
    for pair in pairs:
        for enc in (pair.chosen, pair.rejected):
            h.update(enc.ids.astype(np.int32).tobytes() + enc.mask.astype(np.uint8).tobytes())
            h.update(json.dumps(enc.num_tiles).encode())  # the images by content: a moved folder is the same
            for image in enc.images:
                h.update(Path(image).read_bytes())
    return h.hexdigest()


def weights_fingerprint(weights: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        a = weights[name]
        h.update(f"{name}{a.shape}{a.dtype}".encode())
        h.update(np.asarray(mx.view(a, mx.uint8)).tobytes())
    return h.hexdigest()


def make_reference(run, loader: Optional[Callable] = None):
    """The run's reference (None for ORPO): live, or precomputed once and stored with the run."""
    cfg = run.preference
    if cfg.mode == "orpo":
        return None
    other = None
    if loader is not None:
        other = loader()
        other.freeze()
        other.eval()
    live = LiveReference(run.model, run.frozen, other)
    if not cfg.precompute_ref_logps:
        return live
    batchers = {"train": run.batcher, **({"val": run.val_batcher} if run.val_batcher is not None else {})}
    stamp = {f"data.{s}": data_fingerprint(b.samples) for s, b in batchers.items()}
    stamp["reference"] = weights_fingerprint(live.weights())
    path = run.out / REF_FILE
    saved = _read(path)
    if saved is not None and saved[1] == stamp:
        run.say(f"Reusing the reference log-probs in {path}.")
        return StoredReference(saved[0], batchers)
    if saved is not None and run.result.start_step > 0:
        what = [k.replace("data.train", "the training data").replace("data.val", "the validation data")
                .replace("reference", "the reference model's weights") for k in stamp if saved[1].get(k) != stamp[k]]
        raise UserError(f"--resume: {path} was computed for other inputs ({', '.join(what)} changed since), so "
                        "the steps already taken used other reference values. Resume with the original data and "
                        "reference, or start a new --adapter-path.")
    run.say(f"Computing the reference log-probs of {sum(len(b.samples) for b in batchers.values())} pairs once "
            f"({'recomputing: the data or reference changed; ' if saved is not None else ''}stored in {path}).")
    tables = {split: _compute(live, split, b) for split, b in batchers.items()}
    if run.rank == 0:
        flat = {f"{s}.{side}": mx.array(t[i]) for s, t in tables.items() for i, side in enumerate(("chosen",
                                                                                                    "rejected"))}
        atomic_write(path, lambda tmp: mx.save_safetensors(str(tmp), flat, metadata={"stamp": json.dumps(stamp)}),
                     "reference log-probs")
    return StoredReference(tables, batchers)


def _compute(live: LiveReference, split: str, batcher) -> tuple:
    """Each fixed microbatch of `batcher` through the live reference, scattered back to pair order."""
    n = len(batcher.samples)
    chosen, rejected = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for idx in batcher.batches:
        batch, _ = batcher.rows(idx)
        logps = np.array(live.logps(split, -1, batch))
        chosen[idx], rejected[idx] = logps[: len(idx)], logps[len(idx):]
    return chosen, rejected


def _read(path: Path):
    """(tables, stamp) from a stored file, or None when there is none (or it is unreadable: recomputed)."""
    if not path.is_file():
        return None
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
        stamp = json.loads(meta["stamp"])
        splits = {k.split(".")[0] for k in arrays}
        return {s: (np.array(arrays[f"{s}.chosen"]), np.array(arrays[f"{s}.rejected"])) for s in splits}, stamp
    except (OSError, ValueError, KeyError, RuntimeError):
        return None

"""Training checkpoints that survive a kill at any instant.

A checkpoint is a directory `checkpoints/step-NNNNNNN/` with the adapters, the optimizer state tree (Adam moments,
step, learning rate) as safetensors and `state.json` (step, microbatches consumed, run settings). It is written
under a temporary name and renamed when complete; only then are the top-level `adapters.safetensors` and the
`training_state.json` pointer replaced (each by an atomic rename). A half-written directory is never complete and
is swept on the next start (`files.sweep_stale`, which leaves a live run's alone). Each checkpoint records the
sizes and SHA-256 of its files (`manifest.json`); a resume takes the newest checkpoint that still matches them,
and says which it passed over.

Randomness needs no saved state: every microbatch reseeds MLX's generator from (seed, microbatch index), and the
data order is a function of (seed, epoch), so the step, the microbatch count, the adapters and the optimizer
state are the whole state of a run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..adapters import (
    ADAPTER_FILE,
    check_adapter_weights,
    save_adapters,
    trainable_weights,
)
from ..errors import UserError
from ..files import save_json, staged_output

POINTER = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MANIFEST = "manifest.json"
CHECKPOINT_FILES = (ADAPTER_FILE, OPTIMIZER_FILE, "state.json")


def save_checkpoint(adapter_dir: Path, model, optimizer, step: int, microbatches: int, settings: dict,
                    keep: int = 2) -> Path:
    root = Path(adapter_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    with staged_output(final, force=True) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_FILE), trainable_weights(model),
                            metadata={"format": "mlx-internvl-adapters"})
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
        with open(tmp / "state.json", "w") as f:
            json.dump({"step": step, "microbatches": microbatches, "settings": settings}, f, indent=2)
        # Sizes and hashes of what was written, checked before a resume trusts this checkpoint.
        with open(tmp / MANIFEST, "w") as f:
            json.dump({name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                       for name in CHECKPOINT_FILES}, f, indent=2)
    save_adapters(model, adapter_dir)
    save_json(Path(adapter_dir) / POINTER, {"latest": f"checkpoints/{final.name}", "step": step})
    kept = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in kept[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(path: Path) -> Optional[str]:
    """None if the checkpoint's files match the sizes and hashes recorded when it was saved, else why not."""
    manifest = path / MANIFEST
    try:
        if not manifest.exists():  # written before manifests existed: the files must at least be there and parse
            for name in CHECKPOINT_FILES:
                if not (path / name).is_file():
                    return f"{name} is missing"
            json.loads((path / "state.json").read_text())
            return None
        recorded = json.loads(manifest.read_text())
        for name in CHECKPOINT_FILES:
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != recorded[name]["bytes"]:
                return f"{name} is {f.stat().st_size} bytes, {recorded[name]['bytes']} were written"
            if _sha256(f) != recorded[name]["sha256"]:
                return f"{name} does not match the hash recorded when it was written"
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state.get("step"), int):
            return "state.json has no step"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def latest_checkpoint(adapter_dir: Path, log=None) -> Optional[Path]:
    """The newest checkpoint of the run in `adapter_dir` whose files verify (None when there is none at all).
    Newer ones that fail verification (a truncated or corrupted file) are passed over, and `log` says so."""
    root = Path(adapter_dir) / "checkpoints"
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True) if root.is_dir() else []
    pointer = Path(adapter_dir) / POINTER
    if not candidates:
        if pointer.exists():
            raise UserError(f"{pointer} exists but {root} holds no checkpoint; delete {pointer} to start afresh")
        return None
    rejected = []
    for path in candidates:
        why = verify_checkpoint(path)
        if why is None:
            if rejected and log is not None:
                log("Passed over checkpoint(s) that do not verify: " + "; ".join(rejected)
                    + f". Using {path.name}.")
            return path
        rejected.append(f"{path.name} ({why})")
    raise UserError(f"{adapter_dir}: no checkpoint verifies: {'; '.join(rejected)}. Delete {root} and {pointer} "
                    "to start afresh.")


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Load adapters and optimizer state from a checkpoint directory into `model`/`optimizer`; returns state.json."""
    state = json.loads((path / "state.json").read_text())
    weights = mx.load(str(path / ADAPTER_FILE))
    check_adapter_weights(model, weights, str(path / ADAPTER_FILE))
    model.load_weights(list(weights.items()), strict=False)
    opt = mx.load(str(path / OPTIMIZER_FILE))
    optimizer.state = tree_unflatten(list(opt.items()))
    return state


def adapters_finite(model) -> bool:
    """Whether every trainable (adapter) weight is finite."""
    flags = [mx.all(mx.isfinite(w)) for w in trainable_weights(model).values() if mx.issubdtype(w.dtype, mx.floating)]
    return bool(mx.all(mx.stack(flags)).item()) if flags else True


def stop_diverged(step: int, what: str, out: Path) -> None:
    """Stop a run whose loss or weights turned NaN/inf, naming the step and the checkpoint that stays in force."""
    try:
        last = latest_checkpoint(out)
    except UserError:
        last = None
    kept = (f"the last good checkpoint, {last.name}, and its adapters are kept in {out}; --resume continues from it"
            if last is not None else "no checkpoint had been written yet")
    raise UserError(f"step {step}: {what}, so training stopped; {kept}. Lower --lr (or raise --warmup), and check "
                    "the data.")

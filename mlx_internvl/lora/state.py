"""Training checkpoints that survive a kill at any instant.

A checkpoint is a directory `checkpoints/step-NNNNNNN/` with the adapters, the optimizer state tree (Adam moments,
step, learning rate) as safetensors and `state.json` (step, microbatches consumed, run settings). It is written
under a temporary name and renamed when complete; only then are the top-level `adapters.safetensors` and the
`training_state.json` pointer replaced (each by an atomic rename). A kill before the pointer moves leaves the
previous checkpoint in force; a half-written directory is never pointed at and is swept on the next start.

Randomness needs no saved state: every microbatch reseeds MLX's generator from (seed, microbatch index), and the
data order is a function of (seed, epoch), so the step, the microbatch count, the adapters and the optimizer
state are the whole state of a run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..adapters import ADAPTER_FILE, check_adapter_weights, save_adapters, trainable_weights
from ..errors import UserError
from ..files import save_json, staged_output

POINTER = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


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
    save_adapters(model, adapter_dir)
    save_json(Path(adapter_dir) / POINTER, {"latest": f"checkpoints/{final.name}", "step": step})
    kept = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in kept[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(adapter_dir: Path) -> Optional[Path]:
    pointer = Path(adapter_dir) / POINTER
    if not pointer.exists():
        return None
    try:
        rel = json.loads(pointer.read_text())["latest"]
    except (json.JSONDecodeError, KeyError) as e:
        raise UserError(f"{pointer}: unreadable ({e}); delete it to start the run afresh") from e
    path = Path(adapter_dir) / rel
    if not (path / "state.json").exists():
        raise UserError(f"{pointer} points at {path}, which is incomplete or gone; delete {pointer} to start afresh")
    return path


def sweep_partial(adapter_dir: Path) -> None:
    """Remove checkpoint directories a killed run left half-written (or moved aside while replacing one)."""
    for pattern in (".step-*.partial-*", ".step-*.old-*"):
        for p in (Path(adapter_dir) / "checkpoints").glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Load adapters and optimizer state from a checkpoint directory into `model`/`optimizer`; returns state.json."""
    state = json.loads((path / "state.json").read_text())
    weights = mx.load(str(path / ADAPTER_FILE))
    check_adapter_weights(model, weights, str(path / ADAPTER_FILE))
    model.load_weights(list(weights.items()), strict=False)
    opt = mx.load(str(path / OPTIMIZER_FILE))
    optimizer.state = tree_unflatten(list(opt.items()))
    return state

"""Validation at `--val-every`: SFT's mean cross-entropy per answer token, or for preference pairs the objective
and TRL's metrics on the held-out pairs.

For pairs, each validation microbatch gets the reference log-probs the run uses (live or precomputed) and the
objective of training (`preference.pair_objective`), in eval mode; BCO's running mean is read as training left it
and not changed (validation never moves the training state). The loss is the per-pair mean of the microbatch
objectives; the metrics are per-pair means, written to `loss.csv` with `split=val` under TRL's names, and to
W&B / SwanLab as `val_loss` and `val_rewards/chosen`, ... (mlx-lm's `val_` prefix).
"""

from __future__ import annotations

import time
from typing import Dict, Optional, Tuple

import mlx.core as mx

from .batching import Batcher, val_batches
from .forward import loss_sum, training_logits
from .preference import METRICS, RUNNING_KEY, metrics_dict, pair_objective


def evaluate(model, batcher: Optional[Batcher], limit: int, group, frozen: bool, loss=loss_sum) -> Optional[float]:
    """Mean loss per answer token (SFT's cross-entropy, or a ViCO stage's loss per its unit) over the validation
    batches (split across processes)."""
    if batcher is None:
        return None
    total, count = mx.array(0.0), mx.array(0.0)
    for k in val_batches(batcher, limit)[group.rank():: group.size()]:
        batch, _ = batcher.batch(k)
        ce, n = loss(model, batch, frozen)
        total, count = total + ce, count + n
        mx.eval(total, count)
    if group.size() > 1:
        total, count = mx.distributed.all_sum(total, stream=mx.cpu), mx.distributed.all_sum(count, stream=mx.cpu)
    return (total / mx.maximum(count, 1)).item()


def evaluate_pairs(run) -> Tuple[float, Dict[str, float]]:
    """(mean objective per pair, TRL's metrics as per-pair means) over the validation pairs."""
    cfg, batcher, group = run.preference, run.val_batcher, run.group
    running = run.optimizer.state.get(RUNNING_KEY)
    total, sums, pairs = mx.array(0.0), mx.zeros((len(METRICS),)), 0
    for k in val_batches(batcher, run.args.val_batches)[group.rank():: group.size()]:
        batch, _ = batcher.batch(k)
        ref = None if run.reference is None else run.reference.logps("val", k, batch)
        loss, metrics, _ = pair_objective(cfg, training_logits(run.model, batch, True), batch, ref,
                                          None if running is None else dict(running))
        total, sums, pairs = total + loss, sums + metrics, pairs + batcher.loss_tokens(k)
        mx.eval(total, sums)
    if group.size() > 1:
        total, sums = mx.distributed.all_sum(total, stream=mx.cpu), mx.distributed.all_sum(sums, stream=mx.cpu)
        pairs = int(mx.distributed.all_sum(mx.array(pairs), stream=mx.cpu).item())
    return total.item() / max(pairs, 1), metrics_dict(sums.tolist(), max(pairs, 1))


def validate(run, step: int, bar=None) -> None:
    """Validate, log the row (`loss.csv`, the reporting callback) and print the loss."""
    run.model.eval()
    tic = time.perf_counter()
    if run.preference is None:
        val, metrics = evaluate(run.model, run.val_batcher, run.args.val_batches, run.group, run.frozen,
                                run.loss), {}
    else:
        val, metrics = evaluate_pairs(run)
    run.model.train()
    if run.callback is not None:
        run.callback.on_val_loss_report({"iteration": step, "val_loss": val, "val_time": time.perf_counter() - tic,
                                         **{f"val_{k}": v for k, v in metrics.items()}})
    run.result.val_losses.append((step, val))
    lr = float(run.optimizer.learning_rate.item())
    run.log_file.add(step=step, split="val", loss=f"{val:.6f}", learning_rate=f"{lr:.3e}",
                     peak_memory_gb=f"{mx.get_peak_memory() / 1e9:.3f}", **{k: f"{v:.6f}" for k, v in metrics.items()})
    extra = f", reward accuracy {metrics['rewards/accuracies']:.3f}" if metrics else ""
    (bar.write if bar is not None and not bar.disable else run.say)(f"step {step}: validation loss {val:.4f}{extra}")

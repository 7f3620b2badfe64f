"""The preference training step and optimizer step, the counterparts of `trainer.make_step` / `_optimizer_step`.

Per microbatch: the reference log-probs of its 2P rows come first (`run.reference`, see reference.py: by default
the same model with its adapters taken out, `preference.adapters_off`, not compiled, no gradient); then one
compiled step takes the policy forward, the objective (`preference.pair_objective`) and its gradient, adds it to
the running gradient and, on the last microbatch, scales by `world / pairs of the whole step`, averages over
processes and applies AdamW. BCO's running moments are part of the optimizer state, so the compiled step reads and
writes them with the rest.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.utils import average_gradients
from mlx.utils import tree_map

from ..errors import UserError
from .preference import (
    METRICS,
    RUNNING_KEY,
    PreferenceConfig,
    adapters_off,
    init_running,
    pair_objective,
    sequence_logps,
)


def check_preference_setup(cfg: PreferenceConfig, lora) -> None:
    if cfg.mode != "orpo" and lora.train_projector == "full" and not cfg.reference_model:
        raise UserError("--train-projector full trains the base projector itself, so the model with its adapters "
                        f"switched off is no longer the reference {cfg.mode} needs; use --train-projector lora, or "
                        "give the reference as --reference-model")


def init_preference_state(cfg: PreferenceConfig, optimizer) -> None:
    """Give BCO's running moments their starting values unless a checkpoint brought them back."""
    if "bco_pair" in cfg.losses and RUNNING_KEY not in optimizer.state:
        optimizer.state[RUNNING_KEY] = init_running()


def reference_logps(model, batch: dict, logits_fn: Callable, frozen: bool) -> mx.array:
    """Summed answer log-probs [2P] of the base model (adapters off); nothing is kept for the backward pass."""
    with adapters_off(model):
        logps = sequence_logps(logits_fn(model, batch, frozen), batch)[0]
    return mx.stop_gradient(logps)


def accumulate(model, optimizer, grad, prev_grad, do_update: bool, scale):
    """One microbatch's gradient added to those of the step so far; on the step's last microbatch, scaled,
    averaged over the data-parallel processes and applied (the SFT and preference steps share it). The gradient
    still to carry, or None once applied."""
    if prev_grad is not None:
        grad = tree_map(lambda a, b: a + b, grad, prev_grad)
    if do_update:
        optimizer.update(model, average_gradients(tree_map(lambda g: g * scale, grad)))
        return None
    return grad


def make_preference_step(model, optimizer, cfg: PreferenceConfig, logits_fn: Callable, frozen: bool = True,
                         compile: bool = True, world: int = 1):
    """`(step, state)`: `step(batch, ref, prev_grad, do_update, scale) -> (loss x pairs, metric sums, grad)`."""

    def objective(model, batch, ref, running):
        return pair_objective(cfg, logits_fn(model, batch, frozen), batch, ref, running, world)

    value_and_grad = nn.value_and_grad(model, objective)
    state = [model.state, optimizer.state, mx.random.state]

    def step(batch, ref, prev_grad, do_update, scale):
        (loss, metrics, running), grad = value_and_grad(model, batch, ref, optimizer.state.get(RUNNING_KEY))
        if running is not None:
            # In place and in the held order: a compiled function's inputs are read back in its first call's
            # order (a checkpoint brings the keys back sorted), so a new dict would shuffle mean/var/count.
            held = optimizer.state[RUNNING_KEY]
            for key in held:
                held[key] = running[key]
        return loss, metrics, accumulate(model, optimizer, grad, prev_grad, do_update, scale)

    return (mx.compile(step, inputs=state, outputs=state) if compile else step), state


def preference_optimizer_step(run, step_fn, state):
    """One optimizer step over this process's microbatches of pairs. Returns (summed loss x pairs, pairs), both
    over all processes, and adds the metric sums to `run.metric_window`."""
    args, world = run.args, run.world
    first, per_step = run.consumed, args.grad_accum * world
    pairs = sum(run.batcher.loss_tokens(first + j) for j in range(per_step))
    scale = mx.array(world / pairs, dtype=mx.float32)
    grad, loss_sum, metric_sum = None, mx.array(0.0), mx.zeros((len(METRICS),))
    for j in range(args.grad_accum):
        k = first + j * world + run.rank
        batch, n_inputs = run.batcher.batch(k)
        ref = None if run.reference is None else run.reference.logps("train", k, batch)
        mx.random.seed(args.seed * 1_000_003 + k + 1)  # dropout masks depend on the microbatch only
        loss, metrics, grad = step_fn(batch, ref, grad, j == args.grad_accum - 1, scale)
        loss_sum, metric_sum = loss_sum + loss, metric_sum + metrics
        mx.eval(state, loss_sum, metric_sum, grad)
        run.window[2] += n_inputs
    run.consumed = first + per_step
    if world > 1:
        loss_sum = mx.distributed.all_sum(loss_sum, stream=mx.cpu)
        metric_sum = mx.distributed.all_sum(metric_sum, stream=mx.cpu)
    run.metric_window = [a + b for a, b in zip(run.metric_window, metric_sum.tolist())]
    return loss_sum, pairs

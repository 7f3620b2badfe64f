"""Preference objectives (DPO, MPO, ORPO) as TRL 0.10.1 computes them, the version InternVL's MPO recipe pins.

- A microbatch of P pairs is one batch of 2P rows: the chosen answers, then the rejected ones (TRL's concatenated
  forward). `sequence_logps` is each row's summed log-probability of its answer tokens.
- The reference model is the same model with its adapters taken out (`adapters_off`: every LoRA/DoRA layer is
  swapped for the base layer it wraps, and back), as TRL does with a PEFT model's `disable_adapter()`; no second
  copy of the weights is held.
- DPO's loss types (`sigmoid`, `hinge`, `ipo`, `bco_pair`) can be combined with weights (MPO: sigmoid 0.8 +
  bco_pair 0.2 + `rpo_alpha` 1.0 times the chosen answers' mean cross-entropy); rewards are weighted the same way,
  as InternVL's `MultimodalDPOTrainer` does. IPO alone uses per-token mean log-probs, as upstream.
- BCO's shift is TRL's `RunningMoments` mean of the microbatch reward means; its (mean, var, count) live in the
  optimizer state under `preference_running`, so they are saved with each checkpoint and come back on resume.
- ORPO (no reference): `nll - lambda * mean(logsigmoid(log odds ratio))` on per-token mean log-probs.
- Per microbatch the objective is upstream's microbatch loss times its pair count; the trainer divides the sum by
  the pairs of the whole optimizer step, which is the mean of the microbatch losses that the HF trainer takes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..adapters import adapter_modules
from ..errors import UserError

MODES = ("sft", "dpo", "orpo", "mpo")
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "bco_pair")
MPO_LOSSES = {"sigmoid": 0.8, "bco_pair": 0.2}
RUNNING_KEY = "preference_running"
# TRL's metric names, in the order loss.csv gets them.
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "nll_loss")


@dataclass
class PreferenceConfig:
    mode: str = "dpo"  # dpo | orpo | mpo
    beta: float = 0.1  # DPO's beta; ORPO's lambda
    losses: Dict[str, float] = field(default_factory=lambda: {"sigmoid": 1.0})  # loss type -> weight
    rpo_alpha: Optional[float] = None  # weight of the chosen answers' cross-entropy (None: no such term)
    reference_model: Optional[str] = None  # another checkpoint as the reference (None: adapters off)
    precompute_ref_logps: bool = False  # reference log-probs computed once, stored with the run

    @classmethod
    def make(cls, mode: str, beta: Optional[float] = None, loss_type: Optional[str] = None,
             rpo_alpha: Optional[float] = None, reference_model: Optional[str] = None,
             precompute_ref_logps: bool = False) -> PreferenceConfig:
        if mode not in MODES or mode == "sft":
            raise UserError(f"--train-mode {mode!r}: a preference mode is one of dpo, orpo, mpo")
        beta = 0.1 if beta is None else float(beta)
        if not beta > 0:
            raise UserError(f"--beta must be positive, got {beta}")
        ref = (str(reference_model) if reference_model else None, bool(precompute_ref_logps))
        if mode == "orpo":
            if loss_type or rpo_alpha is not None:
                raise UserError("--loss-type and --rpo-alpha are DPO/MPO options; ORPO has only --beta (lambda)")
            if ref != (None, False):
                raise UserError("--reference-model and --precompute-ref-logps are DPO/MPO options; ORPO uses no "
                                "reference model")
            return cls("orpo", beta, {}, None)
        if mode == "mpo":
            losses = dict(MPO_LOSSES) if not loss_type else parse_loss_types(loss_type)
            return cls("mpo", beta, losses, 1.0 if rpo_alpha is None else float(rpo_alpha), *ref)
        return cls("dpo", beta, parse_loss_types(loss_type or "sigmoid"), rpo_alpha, *ref)

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def average_logps(self) -> bool:
        return self.mode == "orpo" or list(self.losses) == ["ipo"]


def parse_loss_types(text: str) -> Dict[str, float]:
    """`sigmoid` or `sigmoid:0.8,bco_pair:0.2` -> {type: weight} (a lone type has weight 1)."""
    out = {}
    for part in str(text).split(","):
        name, _, weight = part.strip().partition(":")
        if name not in LOSS_TYPES:
            raise UserError(f"--loss-type {name!r}: expected one of {', '.join(LOSS_TYPES)} (several as "
                            "'sigmoid:0.8,bco_pair:0.2')")
        try:
            out[name] = float(weight) if weight else 1.0
        except ValueError:
            raise UserError(f"--loss-type {part!r}: the weight after ':' must be a number") from None
    return out


@contextmanager
def adapters_off(model):
    """The base model: each adapter layer replaced by the layer it wraps (the same arrays), restored on exit."""
    mods = adapter_modules(model)
    model.update_modules(tree_unflatten([(path, m.linear) for path, m in mods]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(list(mods)))


def sequence_logps(logits: mx.array, batch: dict) -> Tuple[mx.array, mx.array, mx.array]:
    """(summed answer-token log-probs [R], answer-token counts [R], summed cross-entropy [R]) per row."""
    weights = batch["mask"][:, 1:]
    ce = nn.losses.cross_entropy(logits[:, :-1], batch["ids"][:, 1:]).astype(mx.float32) * weights
    per_row = ce.sum(-1)
    return -per_row, weights.sum(-1), per_row


def init_running() -> Dict[str, mx.array]:
    return {"mean": mx.array(0.0), "var": mx.array(1.0), "count": mx.array(1e-24)}


def update_running(running: Dict[str, mx.array], xs: mx.array, world: int = 1) -> Dict[str, mx.array]:
    """TRL's `RunningMoments.update` for one microbatch's reward mean `xs` (a scalar; one per process)."""
    if world > 1:
        xs_mean = mx.distributed.all_sum(xs) / world
        xs_var = mx.distributed.all_sum((xs - xs_mean) ** 2) / world
    else:
        xs_mean, xs_var = xs, mx.array(0.0)
    delta, tot = xs_mean - running["mean"], running["count"] + world
    old_sum = running["var"] * running["count"] + delta ** 2 * running["count"] * world / tot
    return {"mean": running["mean"] + delta * world / tot, "var": (old_sum + xs_var * world) / tot, "count": tot}


def dpo_losses(cfg: PreferenceConfig, pc, pr, rc, rr, running=None, world: int = 1):
    """(per-pair losses, chosen rewards, rejected rewards, new running moments) for the configured loss types."""
    losses = chosen = rejected = 0.0
    logits = (pc - pr) - (rc - rr)
    for kind, weight in cfg.losses.items():
        if kind == "sigmoid":
            cur = -nn.log_sigmoid(cfg.beta * logits)
        elif kind == "hinge":
            cur = mx.maximum(1 - cfg.beta * logits, 0.0)
        elif kind == "ipo":
            cur = (logits - 1 / (2 * cfg.beta)) ** 2
        else:  # bco_pair
            c_rew, r_rew = cfg.beta * (pc - rc), cfg.beta * (pr - rr)
            running = update_running(running, mx.stop_gradient(mx.concatenate([c_rew, r_rew]).mean()), world)
            shift = mx.stop_gradient(running["mean"])
            cur = -nn.log_sigmoid(c_rew - shift) - nn.log_sigmoid(-(r_rew - shift))
        losses = losses + weight * cur
        chosen = chosen + weight * mx.stop_gradient(cfg.beta * (pc - rc))
        rejected = rejected + weight * mx.stop_gradient(cfg.beta * (pr - rr))
    return losses, chosen, rejected, running


def orpo_losses(cfg: PreferenceConfig, pc, pr):
    """TRL's odds-ratio term (per pair, before `nll - mean`) and its rewards, from per-token mean log-probs."""
    log_odds = (pc - pr) - (mx.log1p(-mx.exp(pc)) - mx.log1p(-mx.exp(pr)))
    ratio = nn.log_sigmoid(log_odds)
    return cfg.beta * ratio, mx.stop_gradient(cfg.beta * pc), mx.stop_gradient(cfg.beta * pr)


def pair_objective(cfg: PreferenceConfig, logits: mx.array, batch: dict, ref: Optional[mx.array], running=None,
                   world: int = 1):
    """(microbatch loss x pairs, metrics summed over pairs, new running moments) for a 2P-row batch.
    `ref` is the reference's summed answer log-probs [2P] (unused by ORPO)."""
    logps, counts, ce = sequence_logps(logits, batch)
    pairs = logps.shape[0] // 2
    if cfg.average_logps:
        logps = logps / counts
        if ref is not None:
            ref = ref / counts
    pc, pr = logps[:pairs], logps[pairs:]
    nll = ce[:pairs].sum() / counts[:pairs].sum()  # the chosen answers' mean cross-entropy per token
    if cfg.mode == "orpo":
        losses, c_rew, r_rew = orpo_losses(cfg, pc, pr)
        loss = nll - losses.mean()
    else:
        losses, c_rew, r_rew, running = dpo_losses(cfg, pc, pr, ref[:pairs], ref[pairs:], running, world)
        loss = losses.mean() + (cfg.rpo_alpha * nll if cfg.rpo_alpha is not None else 0.0)
    metrics = mx.stack([c_rew.sum(), r_rew.sum(), (c_rew > r_rew).astype(mx.float32).sum(), (c_rew - r_rew).sum(),
                        mx.stop_gradient(pc).sum(), mx.stop_gradient(pr).sum(), mx.stop_gradient(nll) * pairs])
    return loss * pairs, metrics, running


def metrics_dict(sums: List[float], pairs: int) -> Dict[str, float]:
    return {name: value / pairs for name, value in zip(METRICS, sums)}

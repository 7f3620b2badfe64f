"""Preference tuning (DPO / MPO / BCO pair / ORPO) against TRL 0.10.1 and transformers + PEFT: losses, rewards and
LoRA gradients on a tiny model; BCO's running mean over steps and across a SIGKILL + resume; the pair formats."""

import copy
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_lora_peft import randomize_adapters
from trl_reference import import_trl, trl_dpo, trl_orpo, trl_self

import mlx_internvl
from builders import Case
from lora_fixtures import COLORS, color_task
from mlx_internvl.adapters import CONFIG_FILE
from mlx_internvl.files import save_json
from mlx_internvl.lora import LoraConfig, PreferenceConfig, apply_lora, export_peft, save_adapters
from mlx_internvl.lora.batching import collate
from mlx_internvl.lora.pairs import encode_pair, parse_pair
from mlx_internvl.lora.peft import peft_tensors
from mlx_internvl.lora.pref_step import reference_logps
from mlx_internvl.lora.preference import dpo_losses, init_running, orpo_losses, pair_objective
from mlx_internvl.lora.trainer import training_logits

TESTS = Path(__file__).parent
CONFIGS = {
    "dpo_sigmoid": ("dpo", "sigmoid", None),
    "dpo_hinge": ("dpo", "hinge", None),
    "dpo_ipo": ("dpo", "ipo", None),
    "bco_pair": ("dpo", "bco_pair", None),
    "mpo": ("mpo", None, None),
    "orpo": ("orpo", None, None),
}


def _torch(a):
    import torch

    return torch.tensor(np.array(a), dtype=torch.float32)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_losses_and_rewards_equal_trl_over_several_microbatches(name):
    """Three microbatches in a row (so BCO's running mean moves), each compared with TRL's own loss function."""
    import_trl()
    mode, loss_type, rpo = CONFIGS[name]
    cfg = PreferenceConfig.make(mode, 0.3, loss_type, rpo)
    me, running = trl_self(cfg.beta), init_running()
    rng = np.random.default_rng(0)
    for _ in range(3):
        logps = [rng.uniform(-9, -0.5, 5).astype(np.float32) for _ in range(4)]  # pc, pr, rc, rr
        if cfg.mode == "orpo":
            ours, c, r = orpo_losses(cfg, *map(mx.array, logps[:2]))
            theirs, tc, tr = trl_orpo(me, *map(_torch, logps[:2]))
        else:
            ours, c, r, running = dpo_losses(cfg, *map(mx.array, logps), running)
            theirs, tc, tr = trl_dpo(me, cfg.losses, *map(_torch, logps))
        for a, b in ((ours, theirs), (c, tc), (r, tr)):
            np.testing.assert_allclose(np.array(a), b.numpy(), rtol=0, atol=1e-5)
        if "bco_pair" in cfg.losses:
            assert abs(running["mean"].item() - me.running.mean) < 1e-6 and me.running.mean != 0
            assert abs(running["var"].item() - me.running.var) < 1e-5


def _pairs_rows(n: int):
    names = list(COLORS)
    return [{"image": f"train{i}.png", "question": "<image>\nColor?", "chosen": names[i % 4],
             "rejected": names[(i + 1) % 4] + " or so"} for i in range(n)]


@pytest.fixture(scope="module")
def peft_task(build_case, tmp_path_factory):
    built = build_case(Case("lora_peft_qwen2"))
    root = tmp_path_factory.mktemp("pref_grad")
    color_task(root, 3, "train", seed=3)
    model, proc = mlx_internvl.load(built.hf_dir, dtype="float32")
    lora = LoraConfig(rank=4, alpha=8, train_projector="lora")
    apply_lora(model, lora)
    randomize_adapters(model, 5)
    save_adapters(model, root / "ad")
    save_json(root / "ad" / CONFIG_FILE, lora.to_json(base_model=str(built.hf_dir)))
    pairs = [encode_pair(parse_pair(row, root), proc) for row in _pairs_rows(3)]
    batch, _ = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], proc.config, 0, proc.image_token_id)
    peft_dir = export_peft(root / "ad", root / "peft")
    return built, model, batch, peft_dir


def _ours(model, batch, cfg):
    ref = None if cfg.mode == "orpo" else reference_logps(model, batch, training_logits, True)
    running = init_running() if "bco_pair" in cfg.losses else None

    def objective(model):
        # frozen_features=False: the projector is LoRA-trained, so its gradient flows (as in the trainer)
        loss, metrics, _ = pair_objective(cfg, training_logits(model, batch, False), batch, ref, running)
        return loss / 3, metrics

    (loss, metrics), grad = nn.value_and_grad(model, objective)(model)
    named = peft_tensors(dict(tree_flatten(grad)))[0]
    return loss.item(), np.array(metrics) / 3, named


def _theirs(built, peft_dir, batch, cfg):
    """TRL's concatenated forward (get_batch_logps, upstream's chosen-row cross-entropy) on transformers + PEFT,
    the reference under `disable_adapter()` as TRL's null_ref_context; then TRL's losses and torch's backward."""
    import torch
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    DPOTrainer, ORPOTrainer, _ = import_trl()
    model = PeftModel.from_pretrained(copy.deepcopy(built.model), str(peft_dir), is_trainable=True).eval()
    ids = torch.from_numpy(np.array(batch["ids"]).astype(np.int64))
    labels = torch.where(torch.from_numpy(np.array(batch["mask"])) > 0, ids, torch.full_like(ids, -100))
    pv = torch.from_numpy(np.array(batch["pixel_values"])).permute(0, 3, 1, 2).contiguous()

    def logps(m):
        logits = m(input_ids=ids, pixel_values=pv).logits.float()
        if cfg.mode == "orpo":  # ORPO's own, per-token mean
            lp = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
        else:  # DPO's (sum, count); upstream divides for ipo
            lp, size = DPOTrainer.get_batch_logps(logits, labels)
            lp = lp / size if list(cfg.losses) == ["ipo"] else lp
        nll = torch.nn.functional.cross_entropy(logits[:3, :-1].reshape(-1, logits.shape[-1]),
                                                labels[:3, 1:].reshape(-1))
        return lp[:3], lp[3:], nll

    pc, pr, nll = logps(model)
    me = trl_self(cfg.beta)
    if cfg.mode == "orpo":
        losses, c, r = trl_orpo(me, pc, pr)
        loss = nll - losses.mean()
    else:
        with torch.no_grad(), model.disable_adapter():
            rc, rr, _ = logps(model)
        losses, c, r = trl_dpo(me, cfg.losses, pc, pr, rc, rr)
        loss = losses.mean() + (cfg.rpo_alpha * nll if cfg.rpo_alpha is not None else 0)
    loss.backward()
    grads = get_peft_model_state_dict(model, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    metrics = [c.mean(), r.mean(), (c > r).float().mean(), (c - r).mean(), pc.mean(), pr.mean(), nll]
    return loss.item(), np.array([float(m) for m in metrics]), {k: v.numpy() for k, v in grads.items()}


@pytest.mark.parametrize("name", ["mpo", "dpo_sigmoid", "bco_pair", "dpo_ipo", "orpo"])
def test_loss_metrics_and_lora_gradients_equal_trl_on_transformers_peft(peft_task, name):
    built, model, batch, peft_dir = peft_task
    mode, loss_type, rpo = CONFIGS[name]
    cfg = PreferenceConfig.make(mode, None, loss_type, rpo)
    loss, metrics, grads = _ours(model, batch, cfg)
    t_loss, t_metrics, t_grads = _theirs(built, peft_dir, batch, cfg)
    assert abs(loss - t_loss) < 1e-5 * max(1.0, abs(t_loss)), (loss, t_loss)
    # Rewards, accuracy, nll within 1e-5; the summed log-probs (~ -160) to float32's resolution there.
    np.testing.assert_allclose(metrics, t_metrics, rtol=1e-6, atol=1e-5)
    assert sorted(grads) == sorted(t_grads) and len(grads) > 10
    worst = max(float(np.abs(grads[k] - t_grads[k]).max()) for k in grads)
    largest = max(float(np.abs(v).max()) for v in t_grads.values())
    assert largest > 1e-2  # the gradients are not all ~0 (projector included: its LoRA is trained)
    assert min(float(np.abs(v).max()) for v in t_grads.values()) > 1e-4
    assert worst < 1e-5 * max(1.0, largest), (worst, largest)  # 1e-5, relative once gradients exceed 1

"""Preference tuning (DPO / MPO / BCO pair / ORPO) against TRL 0.10.1 and transformers + PEFT: losses, rewards and
LoRA gradients on a tiny model; BCO's running mean over steps and across a SIGKILL + resume; the pair formats."""

import copy
import csv
import json
import os
import subprocess
import sys
import textwrap
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
from mlx_internvl.lora.data import load_dataset
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


def _formats(rows):
    """The same pairs as MMPR, TRL plain, TRL conversational, ms-swift and OpenAI-style lines."""
    out = {k: [] for k in ("mmpr", "trl", "trl_conv", "swift", "openai")}
    for r in rows:
        q, img = r["question"].replace("<image>\n", ""), r["image"]
        out["mmpr"].append(r)
        out["trl"].append({"prompt": r["question"], "chosen": r["chosen"], "rejected": r["rejected"], "images": [img]})
        out["trl_conv"].append({
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}], "images": [img]})
        out["swift"].append({"messages": [{"role": "user", "content": r["question"]},
                                          {"role": "assistant", "content": r["chosen"]}],
                             "rejected_response": r["rejected"], "images": [img]})
        parts = [{"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": q}]
        out["openai"].append({"messages": [{"role": "user", "content": parts},
                                           {"role": "assistant", "content": r["chosen"]}],
                              "rejected": {"role": "assistant", "content": r["rejected"]}})
    return out


def test_pair_formats_give_identical_tokens_and_answer_only_masks(build_case, tmp_path):
    built = build_case(Case("lora_train"))
    _, proc = mlx_internvl.load(built.hf_dir, dtype="float32")
    color_task(tmp_path, 4, "train", seed=0)
    encoded = {}
    for name, rows in _formats(_pairs_rows(4)).items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        data = load_dataset(tmp_path / f"{name}.jsonl", parse=parse_pair)
        assert data.problems == [] and len(data) == 4
        encoded[name] = [encode_pair(p, proc) for p in data.samples]
    first = encoded.pop("mmpr")
    for name, pairs in encoded.items():
        for a, b in zip(first, pairs):
            for side in ("chosen", "rejected"):
                x, y = getattr(a, side), getattr(b, side)
                assert np.array_equal(x.ids, y.ids) and np.array_equal(x.mask, y.mask), (name, side)
    for pair, row in zip(first, _pairs_rows(4)):
        for side in ("chosen", "rejected"):
            enc = getattr(pair, side)
            learned = proc.tokenizer.decode(enc.ids[enc.mask].tolist())
            assert learned == row[side] + "<|im_end|>", learned  # the loss covers the answer and its stop only
        n = min(len(pair.chosen.ids), len(pair.rejected.ids))
        start = int(np.flatnonzero(pair.chosen.mask)[0])
        assert np.array_equal(pair.chosen.ids[:start], pair.rejected.ids[:start]) and start < n  # one prompt


def test_every_bad_pair_line_is_reported_with_file_and_line(tmp_path):
    color_task(tmp_path, 1, "train", seed=0)
    good = _pairs_rows(1)[0]
    lines = [json.dumps(good), "{not json", json.dumps(dict(good, rejected=good["chosen"])),
             json.dumps({k: v for k, v in good.items() if k != "rejected"}), json.dumps(dict(good, image="nope.png")),
             json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}),
             json.dumps({"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"})]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = load_dataset(path, parse=parse_pair)
    assert len(data) == 1
    where = [p.split(": ", 1)[0] for p in data.problems]
    assert where == [f"{path}:{i}" for i in range(2, 8)], data.problems
    text = "\n".join(data.problems)
    for why in ("not valid JSON", "the same text", "missing key 'rejected'", "image not found",
                "not a preference pair", "'chosen' must be an assistant message"):
        assert why in text, (why, text)


RUN = textwrap.dedent("""
    import os, signal, sys
    from mlx_internvl.lora import LoraConfig, PreferenceConfig, TrainingArgs, finetune
    hf, data, out, kill_at, resume = sys.argv[1:6]
    def on_step(step, info):
        if step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)  # a real crash: no cleanup
    finetune(hf, data, out, lora=LoraConfig(rank=4, alpha=8, dropout=0.1, train_projector="lora"),
             args=TrainingArgs(batch_size=2, iters=6, lr=1e-2, save_every=3, report_every=1, seed=7),
             resume=resume == "1", dtype="float32", on_step=on_step, log=lambda *_: None,
             preference=PreferenceConfig.make("mpo", beta=0.5))
""")


def _run(*argv):
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    return subprocess.run([sys.executable, "-c", RUN, *map(str, argv)], env=env, capture_output=True, text=True,
                          timeout=400)


def test_killed_mpo_run_resumes_bitwise_and_bco_running_mean_follows_trl(build_case, tmp_path):
    _, _, RunningMoments = import_trl()
    import torch

    built = build_case(Case("lora_train"))
    color_task(tmp_path, 8, "train", seed=0)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs_rows(8)))
    data = tmp_path / "pairs.jsonl"
    whole = _run(built.hf_dir, data, tmp_path / "whole", 0, 0)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _run(built.hf_dir, data, tmp_path / "killed", 5, 0)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _run(built.hf_dir, data, tmp_path / "killed", 0, 1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = mx.load(str(tmp_path / "whole" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "killed" / "adapters.safetensors"))
    assert sorted(a) == sorted(b) and max(float(mx.abs(a[k] - b[k]).max()) for k in a) == 0.0
    opt = [mx.load(str(d / "checkpoints" / "step-0000006" / "optimizer.safetensors")) for d in (tmp_path / "whole",
                                                                                                   tmp_path / "killed")]
    running = {k: float(opt[1][k].item()) for k in opt[1] if k.startswith("preference_running.")}
    assert len(running) == 3 and all(opt[0][k].item() == v for k, v in running.items())
    with open(tmp_path / "killed" / "loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 7)) and float(rows[-1]["rewards/margins"]) != 0
    # TRL's RunningMoments fed each step's reward mean (one microbatch per step; MPO's weights sum to 1).
    trl_running = RunningMoments(trl_self(0.5).accelerator)
    for r in rows:
        trl_running.update(torch.tensor((float(r["rewards/chosen"]) + float(r["rewards/rejected"])) / 2))
    assert abs(running["preference_running.mean"] - trl_running.mean) < 1e-5, (running, trl_running.mean)
    assert abs(running["preference_running.count"] - trl_running.count) < 1e-6


def _held_out_preference_accuracy(model, proc, root, rows) -> float:
    """Share of held-out pairs whose chosen answer the model gives the higher log-probability."""
    pairs = [encode_pair(parse_pair(r, root), proc) for r in rows]
    batch, _ = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], proc.config, 0, proc.image_token_id)
    from mlx_internvl.lora.preference import sequence_logps

    logps = np.array(sequence_logps(training_logits(model, batch, True), batch)[0])
    return float((logps[: len(rows)] > logps[len(rows):]).mean())


@pytest.mark.slow
def test_cli_mpo_run_logs_trl_metrics_and_prefers_the_chosen_answers_held_out(build_case, tmp_path):
    from click.testing import CliRunner

    from mlx_internvl.cli.main import cli

    built = build_case(Case("lora_train"))
    names = list(COLORS)
    lines = color_task(tmp_path, 24, "train", seed=0) + color_task(tmp_path, 12, "val", seed=1)
    rows = [{"image": x["image"], "question": "<image>\nColor?", "chosen": x["conversations"][-1]["value"],
             "rejected": names[(names.index(x["conversations"][-1]["value"]) + 1 + i % 3) % 4]}
            for i, x in enumerate(lines)]
    train, val = rows[:24], rows[24:]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    base, proc = mlx_internvl.load(built.hf_dir, dtype="float32")
    before = _held_out_preference_accuracy(base, proc, tmp_path, val)
    args = ["lora", "--model", built.hf_dir, "--data", tmp_path / "pairs.jsonl", "--adapter-path", tmp_path / "ad",
            "--dtype", "float32", "--batch-size", 4, "--iters", 36, "--lr", 1e-2, "--warmup", 4, "--report-every", 6,
            "--save-every", 36, "--beta", 0.5, "--train-mode", "mpo"]
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with open(tmp_path / "ad" / "loss.csv", newline="") as f:
        logged = list(csv.DictReader(f))
    assert len(logged) == 6 and {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                                 "logps/chosen", "logps/rejected", "nll_loss"} <= set(logged[0])
    margins = [float(r["rewards/margins"]) for r in logged]
    assert float(logged[-1]["rewards/accuracies"]) >= 0.9 and margins[-1] > 5 * max(margins[0], 0.1), logged
    trained, proc = mlx_internvl.load(built.hf_dir, dtype="float32", adapter_path=tmp_path / "ad")
    after = _held_out_preference_accuracy(trained, proc, tmp_path, val)
    assert before <= 0.6 and after >= 0.75, (before, after)  # 0.5 -> 0.83 when written
    for argv, why in ((args[:-2], "need a preference --train-mode"),  # sft with --beta
                      (args[:-1] + ["orpo", "--loss-type", "hinge"], "ORPO has only --beta"),
                      (args + ["--loss-type", "sigmoid:x"], "the weight after ':' must be a number")):
        bad = CliRunner().invoke(cli, [str(a) for a in argv])
        assert bad.exit_code != 0 and why in str(bad.exception), (why, bad.exception)


def test_multi_turn_prompt_learns_only_the_final_answer(build_case, tmp_path):
    built = build_case(Case("lora_train"))
    _, proc = mlx_internvl.load(built.hf_dir, dtype="float32")
    turns = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "blue"},
             {"role": "user", "content": "Another?"}]
    rows = [{"messages": turns + [{"role": "assistant", "content": "red"}], "rejected": "blue again"},
            {"prompt": turns, "chosen": [{"role": "assistant", "content": "red"}],
             "rejected": [{"role": "assistant", "content": "blue again"}]}]
    a, b = (encode_pair(parse_pair(r, tmp_path), proc) for r in rows)
    for side, text in (("chosen", "red"), ("rejected", "blue again")):
        x, y = getattr(a, side), getattr(b, side)
        assert np.array_equal(x.ids, y.ids) and np.array_equal(x.mask, y.mask)
        assert proc.tokenizer.decode(x.ids[x.mask].tolist()) == text + "<|im_end|>"
        assert "blue" in proc.tokenizer.decode(x.ids[: int(np.flatnonzero(x.mask)[0])].tolist())  # context kept

"""Preference runs: validation on held-out pairs, `--reference-model`, and `--precompute-ref-logps` (with resume).

The held-out figures are recomputed here from the model's own inference forward (`model(ids, pixel_values=...)`,
one row at a time, numpy log-softmax), not through the training code's batching and objective."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_internvl
from builders import Case
from lora_fixtures import color_pairs, color_task
from mlx_internvl.errors import UserError
from mlx_internvl.lora import LoraConfig, PreferenceConfig, TrainingArgs, finetune
from mlx_internvl.lora.batching import collate
from mlx_internvl.lora.pairs import encode_pair, parse_pair
from mlx_internvl.lora.reference import REF_FILE

TESTS = Path(__file__).parent
BETA = 0.5


@pytest.fixture(scope="module")
def task(build_case, tmp_path_factory):
    built = build_case(Case("lora_train"))
    root = tmp_path_factory.mktemp("pref_ref")
    train = color_pairs(color_task(root, 8, "train", seed=0))
    val = color_pairs(color_task(root, 4, "val", seed=1), flip=True)  # held out, and preferring the other way
    for name, rows in (("pairs", train), ("valpairs", val)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return built, root, val


def _answer_logps(model, proc, root, rows):
    """(chosen, rejected) summed log-probs of the answer tokens, row by row through the inference forward."""
    out = []
    for side in ("chosen", "rejected"):
        vals = []
        for r in rows:
            enc = getattr(encode_pair(parse_pair(r, root), proc), side)
            batch, _ = collate([enc], proc.config, 0, proc.image_token_id)
            logits = np.array(model(batch["ids"], pixel_values=batch["pixel_values"]).astype(mx.float32))[0]
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            t = np.flatnonzero(enc.mask)
            vals.append(float(logp[t - 1, enc.ids[t]].sum()))
        out.append(np.array(vals))
    return out


def _csv(path):
    with open(path / "loss.csv", newline="") as f:
        return list(csv.DictReader(f))


def _train(hf, root, out, reference_model=None, precompute=False, iters=6, **kw):
    logged, seen = [], []

    class Callback:  # an mlx-lm TrainingCallback
        def on_train_loss_report(self, info):
            seen.append(("train", info))

        def on_val_loss_report(self, info):
            seen.append(("val", info))

    finetune(hf, root / "pairs.jsonl", out, val=root / "valpairs.jsonl", lora=LoraConfig(rank=4, alpha=8),
             args=TrainingArgs(batch_size=4, iters=iters, lr=1e-2, val_every=3, save_every=3, report_every=3,
                               seed=3, **kw),
             dtype="float32", log=logged.append, training_callback=Callback(),
             preference=PreferenceConfig.make("dpo", BETA, None, None, reference_model, precompute))
    return logged, seen


def _expected(pc, pr, rc, rr):
    c, r = BETA * (pc - rc), BETA * (pr - rr)
    return {"rewards/chosen": c.mean(), "rewards/rejected": r.mean(), "rewards/accuracies": (c > r).mean(),
            "rewards/margins": (c - r).mean(), "logps/chosen": pc.mean(), "logps/rejected": pr.mean(),
            "loss": np.mean(np.logaddexp(0, -BETA * ((pc - rc) - (pr - rr))))}


def _check_row(row, expected):
    for key, value in expected.items():
        assert abs(float(row[key]) - value) < 1e-4 * max(1, abs(value)), (key, row[key], value)


def test_val_metrics_are_those_of_the_held_out_pairs(task, tmp_path):
    built, root, val = task
    logged, seen = _train(built.hf_dir, root, tmp_path / "ad")
    rows = _csv(tmp_path / "ad")
    vals = [r for r in rows if r["split"] == "val"]
    assert [int(r["step"]) for r in vals] == [0, 3, 6]
    assert all(float(vals[0][k]) == 0 for k in ("rewards/chosen", "rewards/margins", "rewards/accuracies"))
    base, proc = mlx_internvl.load(built.hf_dir, dtype="float32")
    trained, _ = mlx_internvl.load(built.hf_dir, dtype="float32", adapter_path=tmp_path / "ad")
    pc, pr = _answer_logps(trained, proc, root, val)
    rc, rr = _answer_logps(base, proc, root, val)
    want = _expected(pc, pr, rc, rr)
    _check_row(vals[-1], want)
    # training prefers the right colour, which the held-out pairs reject: they must come out the other way
    train_rows = [r for r in rows if r["split"] == "train"]
    assert float(train_rows[-1]["rewards/margins"]) > 0 > float(vals[-1]["rewards/margins"])
    assert want["rewards/accuracies"] <= 0.25
    val_reports = [info for split, info in seen if split == "val"]
    assert len(val_reports) == 3 and abs(val_reports[-1]["val_rewards/margins"] - want["rewards/margins"]) < 1e-4
    assert any("reward accuracy" in line for line in logged)


def test_reference_model_is_used_and_a_mismatched_one_is_refused(build_case, task, tmp_path):
    built, root, val = task
    other = build_case(Case("lora_train_ref", seed=5))  # same family, other weights
    _train(built.hf_dir, root, tmp_path / "ad", reference_model=str(other.hf_dir), iters=3)
    first = [r for r in _csv(tmp_path / "ad") if r["split"] == "val"][0]
    base, proc = mlx_internvl.load(built.hf_dir, dtype="float32")
    ref, _ = mlx_internvl.load(other.hf_dir, dtype="float32")
    pc, pr = _answer_logps(base, proc, root, val)
    rc, rr = _answer_logps(ref, proc, root, val)
    want = _expected(pc, pr, rc, rr)
    assert abs(want["rewards/chosen"]) > 1  # step 0: policy = base, so the rewards are base vs the other model
    _check_row(first, want)
    odd = build_case(Case("lora_train_hermes", template="Hermes-2"))
    with pytest.raises(UserError, match="chat template: 'internvl2_5' .model. vs 'Hermes-2' .reference."):
        _train(built.hf_dir, root, tmp_path / "ad2", reference_model=str(odd.original_dir), iters=1)
    with pytest.raises(UserError, match="ORPO uses no reference model"):
        PreferenceConfig.make("orpo", precompute_ref_logps=True)


@pytest.mark.parametrize("reference", [False, True], ids=["adapters-off", "reference-model"])
def test_precomputed_reference_gives_the_same_run(build_case, task, tmp_path, reference):
    built, root, _ = task
    other = str(build_case(Case("lora_train_ref", seed=5)).hf_dir) if reference else None
    _train(built.hf_dir, root, tmp_path / "live", reference_model=other)
    logged, _ = _train(built.hf_dir, root, tmp_path / "pre", reference_model=other, precompute=True)
    assert any("Computing the reference log-probs of 12 pairs once" in line for line in logged)
    assert (tmp_path / "pre" / REF_FILE).is_file() and not (tmp_path / "live" / REF_FILE).exists()
    live, pre = _csv(tmp_path / "live"), _csv(tmp_path / "pre")
    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "nll_loss"]
    assert len(live) == len(pre) == 5  # val 0, train 3, val 3, train 6, val 6
    for a, b in zip(live, pre):
        for k in keys:
            assert abs(float(a[k]) - float(b[k])) <= 1e-6, (k, a, b)
    a = mx.load(str(tmp_path / "live" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "pre" / "adapters.safetensors"))
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


RUN = textwrap.dedent("""
    import os, signal, sys
    from mlx_internvl.lora import LoraConfig, PreferenceConfig, TrainingArgs, finetune
    hf, root, out, kill_at, resume = sys.argv[1:6]
    def on_step(step, info):
        if step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
    finetune(hf, root + "/pairs.jsonl", out, val=root + "/valpairs.jsonl", lora=LoraConfig(rank=4, alpha=8),
             args=TrainingArgs(batch_size=2, iters=6, lr=1e-2, val_every=3, save_every=3, report_every=1, seed=3),
             resume=resume == "1", dtype="float32", on_step=on_step, log=print,
             preference=PreferenceConfig.make("mpo", 0.5, precompute_ref_logps=True))
""")


def _run(*argv):
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    return subprocess.run([sys.executable, "-c", RUN, *map(str, argv)], env=env, capture_output=True, text=True,
                          timeout=400)


def test_resume_reuses_the_stored_reference_and_refuses_changed_data(task, tmp_path):
    built, root, _ = task
    whole = _run(built.hf_dir, root, tmp_path / "whole", 0, 0)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _run(built.hf_dir, root, tmp_path / "killed", 5, 0)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    stored = tmp_path / "killed" / REF_FILE
    before = (stored.read_bytes(), stored.stat().st_mtime_ns)
    resumed = _run(built.hf_dir, root, tmp_path / "killed", 0, 1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Reusing the reference log-probs in {stored}" in resumed.stdout and "Computing" not in resumed.stdout
    assert (stored.read_bytes(), stored.stat().st_mtime_ns) == before
    a = mx.load(str(tmp_path / "whole" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "killed" / "adapters.safetensors"))
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) == 0.0
    # the finished run resumed on changed pairs: refused, as the steps taken used the old reference values
    changed = tmp_path / "changed"
    shutil.copytree(root, changed)
    rows = [json.loads(x) for x in (changed / "pairs.jsonl").read_text().splitlines()]
    rows[0]["rejected"] = "purple"
    (changed / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = _run(built.hf_dir, root, tmp_path / "whole", 0, 1)  # the same pairs: reused
    assert again.returncode == 0 and "Reusing" in again.stdout, again.stderr[-2000:]
    refused = _run(built.hf_dir, changed, tmp_path / "whole", 0, 1)
    assert refused.returncode != 0 and "the training data changed since" in refused.stderr, refused.stderr[-2000:]

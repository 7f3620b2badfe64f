"""LoRA training: a tiny model learns a synthetic image task; a killed run resumes to the same adapters;
checkpoints are atomic."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_internvl
from builders import Case
from lora_fixtures import color_task, greedy_answer
from mlx_internvl.errors import UserError
from mlx_internvl.lora import LoraConfig, TrainingArgs, finetune
from mlx_internvl.lora.state import latest_checkpoint, save_checkpoint

CASE = Case("lora_train")
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def task(build_case, tmp_path_factory):
    built = build_case(CASE)
    root = tmp_path_factory.mktemp("color_task")
    train = color_task(root, 48, "train", seed=0)
    val = color_task(root, 16, "val", seed=1)
    return built, root, train, val


def test_tiny_model_learns_colours_and_answers_held_out_images(task, tmp_path):
    built, root, _, val = task
    model, proc = mlx_internvl.load(built.hf_dir, dtype="float32")
    before = [greedy_answer(model, proc, root / line["image"]) for line in val]
    args = TrainingArgs(batch_size=4, iters=120, lr=5e-3, warmup=10, val_every=40, save_every=60, report_every=20)
    result = finetune(built.hf_dir, root / "train.jsonl", tmp_path / "ad", val=root / "val.jsonl",
                      lora=LoraConfig(rank=8, alpha=16), args=args, dtype="float32", log=lambda *_: None)
    start, end = result.val_losses[0][1], result.val_losses[-1][1]
    assert result.val_losses[0][0] == 0 and result.val_losses[-1][0] == 120
    assert end < 0.05 * start, result.val_losses
    model, proc = mlx_internvl.load(built.hf_dir, dtype="float32", adapter_path=tmp_path / "ad")
    answers = [greedy_answer(model, proc, root / line["image"]) for line in val]
    truth = [line["conversations"][-1]["value"] for line in val]
    assert sum(a == t for a, t in zip(before, truth)) <= 4  # the untrained model does not know the task
    assert sum(a == t for a, t in zip(answers, truth)) >= 15, list(zip(answers, truth))
    rows = (tmp_path / "ad" / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("step,split,loss") and len(rows) == 1 + 6 + 4
    assert (tmp_path / "ad" / "loss.png").stat().st_size > 1000


RUN = textwrap.dedent("""
    import os, signal, sys
    from mlx_internvl.lora import LoraConfig, TrainingArgs, finetune
    hf, data, out, kill_at, resume = sys.argv[1:6]
    def on_step(step, info):
        if step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally blocks: a real crash
    finetune(hf, data, out, lora=LoraConfig(rank=4, alpha=8, dropout=0.1, train_projector="lora"),
             args=TrainingArgs(batch_size=2, grad_accum=2, iters=8, lr=1e-3, save_every=3, seed=7),
             resume=resume == "1", dtype="float32", on_step=on_step, log=lambda *_: None)
""")


def _run(*argv):
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    return subprocess.run([sys.executable, "-c", RUN, *map(str, argv)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_killed_run_resumes_to_the_same_adapters(task, tmp_path):
    built, root, _, _ = task
    data = root / "train.jsonl"
    whole = _run(built.hf_dir, data, tmp_path / "whole", 0, 0)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _run(built.hf_dir, data, tmp_path / "killed", 5, 0)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "killed").name == "step-0000003"
    resumed = _run(built.hf_dir, data, tmp_path / "killed", 0, 1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = mx.load(str(tmp_path / "whole" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "killed" / "adapters.safetensors"))
    assert sorted(a) == sorted(b) and any("mlp1" in k for k in a)
    diffs = {k: float(mx.abs(a[k] - b[k]).max()) for k in a}
    # Same microbatches, same dropout masks (reseeded per microbatch), same optimizer state: bitwise equal.
    assert max(diffs.values()) == 0.0, diffs
    assert max(float(mx.abs(v).max()) for k, v in a.items() if k.endswith("lora_b")) > 0
    rows = [r.split(",")[0] for r in (tmp_path / "killed" / "loss.csv").read_text().splitlines()[1:]]
    assert rows == sorted(set(rows), key=int)  # rows logged after step 3 by the killed run were dropped


def test_checkpoint_write_is_atomic(task, tmp_path, monkeypatch):
    built, _, _, _ = task
    model, _ = mlx_internvl.load(built.hf_dir, dtype="float32")
    from mlx_internvl.lora import apply_lora
    from mlx_internvl.lora.trainer import make_optimizer

    apply_lora(model, LoraConfig(rank=2))
    opt = make_optimizer(TrainingArgs(), 10)
    opt.init(model.trainable_parameters())
    first = save_checkpoint(tmp_path, model, opt, 1, 2, {})
    saved = mx.load(str(tmp_path / "adapters.safetensors"))
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = m.lora_b + 1.0
    real = mx.save_safetensors

    def failing(path, tensors, metadata=None):
        if path.endswith("optimizer.safetensors"):
            raise OSError(28, "No space left on device")
        return real(path, tensors, metadata=metadata)

    monkeypatch.setattr("mlx_internvl.lora.state.mx.save_safetensors", failing)
    with pytest.raises(UserError, match="no space left on the device"):
        save_checkpoint(tmp_path, model, opt, 2, 4, {})
    assert latest_checkpoint(tmp_path) == first
    assert not list((tmp_path / "checkpoints").glob(".step-*"))
    after = mx.load(str(tmp_path / "adapters.safetensors"))
    assert all(np.array_equal(np.array(saved[k]), np.array(after[k])) for k in saved)


def test_fresh_run_refuses_a_directory_with_a_run_in_it(task, tmp_path):
    built, root, _, _ = task
    kwargs = dict(args=TrainingArgs(batch_size=4, iters=1, save_every=1), dtype="float32", log=lambda *_: None)
    finetune(built.hf_dir, root / "val.jsonl", tmp_path / "ad", **kwargs)
    with pytest.raises(UserError, match="already holds a training run.*--resume"):
        finetune(built.hf_dir, root / "val.jsonl", tmp_path / "ad", **kwargs)
    with pytest.raises(UserError, match="settings changed.*batch_size"):
        finetune(built.hf_dir, root / "val.jsonl", tmp_path / "ad", resume=True,
                 args=TrainingArgs(batch_size=2, iters=2), dtype="float32", log=lambda *_: None)


def test_qlora_trains_on_a_4bit_base_and_gradient_checkpointing_changes_nothing(task, tmp_path):
    built, root, _, _ = task
    common = dict(lora=LoraConfig(rank=4, alpha=8), dtype="float32", log=lambda *_: None)
    runs = {}
    for gc in (False, True):
        args = TrainingArgs(batch_size=4, iters=4, lr=1e-2, save_every=4, val_batches=2, grad_checkpoint=gc)
        runs[gc] = finetune(built.hf_dir, root / "val.jsonl", tmp_path / f"q{gc}", val=root / "val.jsonl",
                            args=args, quantize_bits=4, q_group_size=32, **common)
    a, b = (mx.load(str(tmp_path / f"q{gc}" / "adapters.safetensors")) for gc in (False, True))
    assert max(float(mx.abs(a[k] - b[k]).max()) for k in a) < 1e-6
    losses = [v for _, v in runs[True].val_losses]
    assert losses[-1] < 0.7 * losses[0], losses
    config = json.loads((tmp_path / "qTrue" / "adapter_config.json").read_text())
    assert config["base_quantization"]["bits"] == 4

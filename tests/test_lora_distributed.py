"""Data-parallel LoRA: two processes (mlx.launch, ring backend over localhost) equal one process with twice the
gradient accumulation."""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from builders import Case
from lora_fixtures import color_pairs, color_task

BIN = Path(sys.executable).parent


def free_port_pair() -> int:
    for _ in range(20):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        try:
            with socket.socket() as b:
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def lora_cli(hf_dir, data, out, *extra):
    exe = shutil.which("mlx-internvl", path=str(BIN)) or "mlx-internvl"
    return [exe, "lora", "--model", str(hf_dir), "--data", str(data), "--adapter-path", str(out), "--dtype",
            "float32", "--batch-size", "2", "--iters", "4", "--lr", "1e-3", "--seed", "3", "--report-every", "1",
            *extra]


def run(cmd):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-3000:])
    return r


def test_two_processes_equal_one_process_with_double_accumulation(build_case, tmp_path):
    launch = shutil.which("mlx.launch", path=str(BIN))
    if launch is None:
        pytest.skip("mlx.launch is not installed next to this Python")
    built = build_case(Case("lora_dist"))
    color_task(tmp_path, 24, "train", seed=5)
    data = tmp_path / "train.jsonl"
    run(lora_cli(built.hf_dir, data, tmp_path / "one", "--grad-accum", "2"))
    run([launch, "-n", "2", "--backend", "ring", "--starting-port", str(free_port_pair()),
         *lora_cli(built.hf_dir, data, tmp_path / "two")])
    run(lora_cli(built.hf_dir, data, tmp_path / "small", "--grad-accum", "1"))
    one, two, small = (mx.load(str(tmp_path / d / "adapters.safetensors")) for d in ("one", "two", "small"))
    assert sorted(one) == sorted(two)
    same = max(float(mx.abs(one[k] - two[k]).max()) for k in one)
    other = max(float(mx.abs(one[k] - small[k]).max()) for k in one)
    # Equal up to the order of fp32 sums across processes; a run with a different effective batch is far off.
    assert same < 1e-5, same
    assert other > 100 * max(same, 1e-7), (same, other)
    # The reported loss (all processes' answer tokens together) is the same too.
    losses = [[float(r.split(",")[2]) for r in (tmp_path / d / "loss.csv").read_text().splitlines()[1:]]
              for d in ("one", "two")]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_two_processes_equal_one_process_for_dpo_pairs(build_case, tmp_path):
    """DPO (sigmoid + the chosen answers' cross-entropy) over pairs: the reference forward, the per-pair
    normalisation and the TRL metrics agree between 2 processes and 1 process with twice the accumulation. (MPO's
    BCO running mean is not: across processes it takes each microbatch's rewards together, as TRL's RunningMoments
    gathers them, so the shift a microbatch sees depends on the split.)"""
    launch = shutil.which("mlx.launch", path=str(BIN))
    if launch is None:
        pytest.skip("mlx.launch is not installed next to this Python")
    built = build_case(Case("lora_dist"))
    rows = color_pairs(color_task(tmp_path, 16, "train", seed=5))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pref = ["--train-mode", "dpo", "--beta", "0.5", "--rpo-alpha", "1", "--lr", "1e-2"]
    run(lora_cli(built.hf_dir, data, tmp_path / "one", "--grad-accum", "2", *pref))
    run([launch, "-n", "2", "--backend", "ring", "--starting-port", str(free_port_pair()),
         *lora_cli(built.hf_dir, data, tmp_path / "two", *pref)])
    run(lora_cli(built.hf_dir, data, tmp_path / "small", "--grad-accum", "1", *pref))
    one, two, small = (mx.load(str(tmp_path / d / "adapters.safetensors")) for d in ("one", "two", "small"))
    same = max(float(mx.abs(one[k] - two[k]).max()) for k in one)
    other = max(float(mx.abs(one[k] - small[k]).max()) for k in one)
    assert same < 1e-5 and other > 100 * max(same, 1e-7), (same, other)
    logs = []
    for d in ("one", "two"):
        with open(tmp_path / d / "loss.csv", newline="") as f:
            logs.append(list(csv.DictReader(f)))
    assert len(logs[0]) == 4
    for a, b in zip(*logs):
        for key in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "nll_loss"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-5), (key, a, b)

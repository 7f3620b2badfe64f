"""The fine-tune walkthrough (docs/fine-tune.md) on the command line: data -> `lora` -> `fuse` -> `generate`, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from builders import Case
from lora_fixtures import QUESTION, color_task
from mlx_internvl.cli.main import cli


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_walkthrough_train_fuse_generate(build_case, tmp_path):
    built = build_case(Case("lora_cli"))
    color_task(tmp_path, 32, "train", seed=11)
    val = color_task(tmp_path, 8, "val", seed=12)
    ad, fused = tmp_path / "adapters", tmp_path / "fused"
    out = invoke("lora", "--model", built.hf_dir, "--data", tmp_path / "train.jsonl", "--val", tmp_path / "val.jsonl",
                 "--adapter-path", ad, "--dtype", "float32", "--batch-size", 4, "--iters", 40, "--lr", 2e-3,
                 "--warmup", 10, "--val-every", 20, "--save-every", 20)
    assert "validation loss" in out
    for name in ("adapters.safetensors", "adapter_config.json", "loss.csv", "loss.png", "training_state.json"):
        assert (ad / name).exists(), name
    invoke("fuse", "--model", built.hf_dir, "--adapter-path", ad, "--out", fused, "--export-peft", tmp_path / "peft")
    assert (fused / "config.json").exists() and (tmp_path / "peft" / "adapter_model.safetensors").exists()
    changed = 0
    for line in val[:4]:
        common = ["--image", tmp_path / line["image"], "--prompt", QUESTION, "--system", "", "--max-tokens", 8]
        with_adapter = invoke("generate", "--model", built.hf_dir, "--adapter", ad, "--dtype", "float32", *common)
        from_fused = invoke("generate", "--model", fused, *common)
        base = invoke("generate", "--model", built.hf_dir, "--dtype", "float32", *common)
        assert with_adapter == from_fused
        changed += with_adapter != base
    assert changed == 4  # how well the adapters answer is test_lora_train's subject


def test_bad_data_is_one_error_listing_each_line(build_case, tmp_path):
    built = build_case(Case("lora_cli"))
    color_task(tmp_path, 2, "train", seed=0)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines.insert(1, "{broken")
    lines.append(json.dumps({"image": "nowhere.png", "conversations": []}))
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    r = subprocess.run([sys.executable, "-m", "mlx_internvl.cli.main", "lora", "--model", str(built.hf_dir),
                        "--data", str(tmp_path / "bad.jsonl"), "--adapter-path", str(tmp_path / "ad")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("Error: training data: 2 bad sample(s)")
    assert "bad.jsonl:2: not valid JSON" in r.stderr and "bad.jsonl:4: image not found" in r.stderr
    assert "--skip-bad" in r.stderr

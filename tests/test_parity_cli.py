"""`mlx-internvl parity`: the one-shot run, and the dump (torch) / compare (MLX) split, through the real command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from conftest import ASSETS
from test_parity import QWEN2

from builders import Case
from mlx_internvl.convert import convert
from mlx_internvl.errors import UserError
from mlx_internvl.parity import compare_dump, format_report, read_dump, run_parity

IMAGE = ASSETS / "images" / "image1.jpg"


def start(*args):
    return subprocess.Popen([shutil.which("mlx-internvl"), "parity", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, expect=0):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == expect, (out, err)
    return out, err


def check_fp32(report: dict, tokens: int) -> None:
    stages = report["stages"]
    assert set(stages) == {"vision_features", "image_features", "inputs_embeds", "logits", "decode_logits"}
    assert stages["vision_features"]["max_abs"] < 1e-5
    assert stages["logits"]["max_abs"] < 1e-4
    assert report["greedy_tokens"]["agree"] == report["greedy_tokens"]["n"] == tokens


def test_parity_cli_one_shot_and_split(build_case, tmp_path):
    built = build_case(QWEN2)
    one = start(built.hf_dir, "--image", IMAGE, "--prompt", "What is in the picture?", "--max-tiles", 2,
                "--tokens", 8, "--json", tmp_path / "one.json")
    dump = start("dump", built.original_dir, "--image", IMAGE, "--prompt", "Describe it.", "--tokens", 12,
                 "--out", tmp_path / "stages.npz")
    mlx_dir = convert(built.original_dir, tmp_path / "mlx")

    out, _ = finish(one)
    report = json.loads((tmp_path / "one.json").read_text())
    check_fp32(report, 8)
    assert report["num_tiles"] == [1] and report["reference"]["device"] == "cpu"
    for line in ("vision_features", "logits", "decode_logits", "greedy tokens: 8/8 identical"):
        assert line in out
    assert format_report(report) in out

    out, _ = finish(dump)
    assert "wrote" in out
    inputs, ref, meta = read_dump(tmp_path / "stages.npz")
    assert meta["tokens"] == 12 and meta["image_token_id"] == built.image_token_id
    assert inputs["pixel_values"].shape[0] == sum(meta["num_tiles"]) > 1
    assert (inputs["input_ids"] == built.image_token_id).sum() == inputs["pixel_values"].shape[0] * 4

    # The MLX half reads the inputs from the file: the converted directory and the HF directory both work.
    compare = start("compare", mlx_dir, tmp_path / "stages.npz", "--json", tmp_path / "cmp.json")
    missing = start("compare", mlx_dir, tmp_path / "nope.npz")
    check_fp32(compare_dump(built.hf_dir, tmp_path / "stages.npz"), 12)
    out, _ = finish(compare)
    check_fp32(json.loads((tmp_path / "cmp.json").read_text()), 12)
    assert "greedy tokens: 12/12 identical" in out
    _, err = finish(missing, expect=1)
    assert err.strip().splitlines() == [f"Error: {tmp_path / 'nope.npz'}: no such file; write it with "
                                        "`mlx-internvl parity dump`"]


def test_parity_v1_original_checkpoint(build_case):
    """ps_version v1 exists only in the original layout; the reference adds the v1 order to transformers."""
    built = build_case(Case("m_psv1", ps_version="v1", text="internlm2", template="internlm2-chat"))
    report = run_parity(built.original_dir, [IMAGE], "Describe it.", device="cpu", max_tiles=2, tokens=8)
    assert report["reference"]["ps_version"] == "v1"
    check_fp32(report, 8)


def test_parity_errors(build_case, tmp_path):
    import torch

    built = build_case(QWEN2)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="torch device 'cuda' is not available here"):
            run_parity(built.hf_dir, [IMAGE], device="cuda")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(3))
    with pytest.raises(UserError, match="not a stages file"):
        read_dump(bad)


def test_a_dump_onto_a_full_disk_is_one_clear_error_and_leaves_nothing(build_case, tmp_path, monkeypatch):
    import errno

    from mlx_internvl.parity import dump_reference

    built = build_case(QWEN2)
    out = tmp_path / "stages.npz"
    out.write_bytes(b"an earlier dump")
    real = np.savez

    def full_disk(file, *args, **kwargs):  # some bytes reach the file, then the device is full
        f = open(file, "wb") if isinstance(file, (str, os.PathLike)) else file
        f.write(b"\0" * 4096)
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(UserError) as e:
        dump_reference(built.original_dir, out, [IMAGE], tokens=2)
    assert str(e.value).startswith(f"cannot write the stages file {out}: no space left on the device; free some "
                                   "space or write elsewhere. Nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.npz"] and out.read_bytes() == b"an earlier dump"
    monkeypatch.setattr(np, "savez", real)
    dump_reference(built.original_dir, out, [IMAGE], tokens=2)
    assert read_dump(out)[2]["tokens"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["stages.npz"]

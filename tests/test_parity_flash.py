"""`mlx-internvl parity` on an InternVL3.5-Flash checkpoint: the router's stages against the checkpoint's own remote
code (the Flash repos' `modeling_internvl_chat.py` from $MLX_INTERNVL_UPSTREAM_FLASH, placed in the checkpoint
folder at test time with the stand-in sibling modules of tests/upstream_flash/; skipped without it).

The dump runs through the real command, `parity dump --trust-remote-code`, which loads that folder's code as
transformers' `trust_remote_code` does; compare runs here, once as it is and once per deliberate break of the MLX
router, whose stages must then be reported as failing.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest
from flash_oracle import add_remote_code, upstream_flash, upstream_modeling, write_flash_checkpoint
from test_flash import ABSOLUTE, CASE, IMAGES, MAX_TILES, RELATIVE

import mlx_internvl.model
from mlx_internvl.errors import UserError
from mlx_internvl.flash import CrossAttentionPooling
from mlx_internvl.parity import compare_dump, dump_reference, format_report

IMAGE = IMAGES[1]  # 3 tiles at MAX_TILES, of which the router compresses some and keeps others
PROMPT = "Describe the image."
TENSORS = ("router_pooled", "router_p0", "router_low", "router_full", "router_logits")
# tests/test_parity.py's fp32 bounds: features 1e-4, p0 (a probability) as tight as the ViT's 1e-5; the routed
# prompt's logits in relative error, as tests/test_flash.py holds them over its long 448 px prompts.
TOL = {"router_pooled": 1e-4, "router_p0": 1e-5, "router_low": 1e-4, "router_full": 1e-4}
LOGITS_REL = 1e-4


@pytest.fixture(scope="module")
def flash_dump(build_case, tmp_path_factory):
    """The Flash checkpoint with its remote code, and the reference stages `parity dump` wrote for it."""
    upstream_modeling()  # skips without the upstream file, before anything is built
    built = build_case(CASE)
    up = upstream_flash(built, RELATIVE, ABSOLUTE)
    root = tmp_path_factory.mktemp("parity_flash")
    ckpt = add_remote_code(write_flash_checkpoint(built, up, root / "ckpt"))
    out = root / "stages.npz"
    env = dict(os.environ, HF_HOME=str(root / "hf"))  # transformers copies the remote code under HF_HOME
    proc = subprocess.run([shutil.which("mlx-internvl"), "parity", "dump", str(ckpt), "--image", IMAGE, "--prompt",
                           PROMPT, "--max-tiles", str(MAX_TILES), "--tokens", "2", "--device", "cpu",
                           "--trust-remote-code", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return ckpt, out


def check_router(report: dict) -> list:
    """The router stages that fail their bounds (decisions and ids: any difference)."""
    stages, router = report["stages"], report["router"]
    bad = [k for k in TOL if "error" in stages[k] or stages[k]["max_abs"] >= TOL[k]]
    logits = stages["router_logits"]
    if "error" in logits or logits["rel"] >= LOGITS_REL:
        bad.append("router_logits")
    return bad + [f"router_{k}" for k in ("decisions", "ids") if not router[k]["identical"]]


def test_router_stages_match_the_checkpoints_remote_code(flash_dump):
    ckpt, dump = flash_dump
    report = compare_dump(ckpt, dump)
    assert set(TENSORS) <= set(report["stages"]) and set(report["router"]) == {"decisions", "ids"}
    assert check_router(report) == []
    decisions, ids = report["router"]["decisions"], report["router"]["ids"]
    assert 0 < sum(decisions["reference"]) < len(decisions["reference"]) == 3  # both outcomes occur
    assert ids["length_ref"] == report["prompt_tokens"] - 192 * sum(decisions["reference"])
    assert report["stages"]["router_low"]["shape"][1:] == [64, 64]
    assert report["stages"]["router_full"]["shape"][1:] == [256, 64]
    assert report["reference"]["router"] == "modeling_internvl_chat.InternVLChatModel (the checkpoint's remote code)"
    text = format_report(report)
    for row in TENSORS:
        assert f"\n{row} " in text
    assert f"router decisions: identical, {sum(decisions['reference'])}/3 tiles compressed" in text
    assert f"router prompt ids: identical ({ids['length_ref']} ids)" in text


def _skip_a_pooling_step(self, x):
    """The pooling with attn2 run twice instead of three times."""
    import mlx.core as mx

    out = mx.broadcast_to(self.query_token[None], (x.shape[0], 1, x.shape[-1]))
    out = self.norm1(self.attn1(out, self.attn1.keys_values(x)))
    kv = self.attn2.keys_values(x)
    for _ in range(2):
        out = self.norm2(self.attn2(out, kv))
    return out[:, 0]


def _flipped_quantile(route):
    return lambda p0, relative, absolute: route(p0, 1 - relative, absolute)


@pytest.mark.parametrize("break_,failing", [
    ("pooling", {"router_pooled", "router_p0"}),
    ("quantile", {"router_decisions", "router_ids", "router_logits"}),
])
def test_compare_reports_a_broken_router(flash_dump, monkeypatch, break_, failing):
    ckpt, dump = flash_dump
    if break_ == "pooling":
        monkeypatch.setattr(CrossAttentionPooling, "__call__", _skip_a_pooling_step)
    else:
        monkeypatch.setattr(mlx_internvl.model, "route", _flipped_quantile(mlx_internvl.model.route))
    report = compare_dump(ckpt, dump)
    assert failing <= set(check_router(report))
    assert report["stages"]["router_full"]["max_abs"] < TOL["router_full"]  # mlp1 takes no part in either break
    if break_ == "quantile":
        text = format_report(report)
        assert "router decisions: DIFFER from tile" in text and "router prompt ids: DIFFER" in text
        assert "router_logits    shape mismatch" in text


def test_dump_needs_the_remote_code_and_consent(flash_dump, tmp_path):
    ckpt, _ = flash_dump
    with pytest.raises(UserError, match=r"InternVL3.5-Flash checkpoint .* pass --trust-remote-code"):
        dump_reference(ckpt, tmp_path / "x.npz", [IMAGE], PROMPT, device="cpu", max_tiles=MAX_TILES, tokens=1)
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    (bare / "modeling_internvl_chat.py").unlink()
    with pytest.raises(UserError, match=r"the folder lacks modeling_internvl_chat.py.*hf download"):
        dump_reference(bare, tmp_path / "x.npz", [IMAGE], PROMPT, device="cpu", max_tiles=MAX_TILES, tokens=1,
                       trust_remote_code=True)
    assert not (tmp_path / "x.npz").exists()


def test_compare_refuses_a_model_without_the_router(flash_dump, tmp_path):
    import json

    ckpt, dump = flash_dump
    off = tmp_path / "off"
    shutil.copytree(ckpt, off)
    cfg = json.loads((off / "config.json").read_text())
    (off / "config.json").write_text(json.dumps(dict(cfg, flash_mode=False)))
    with pytest.raises(UserError, match="hold an InternVL3.5-Flash router.s, but .* runs no router"):
        compare_dump(off, dump)
    assert np.load(dump)["ref_router_decisions"].dtype == bool

"""The rename tables are written once and read both ways: every key of real checkpoints of both layouts survives
the round trip through our names, and an anchored or longer row wins in either direction."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from builders import Case
from mlx_internvl.convert.keymap import HF_PREFIXES, HF_VISION, INTERNLM2, ORIGINAL, Renames


def keys(path):
    out = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            out += list(st.keys())
    return out


CASES = [Case("smoke_qwen2"), Case("m_internlm2", text="internlm2", template="internlm2-chat")]


@pytest.mark.parametrize("case", CASES)
def test_every_checkpoint_key_round_trips(build_case, case):
    built = build_case(case)
    for k in keys(built.hf_dir):
        legacy = HF_PREFIXES.to_ours(k)
        if not legacy.startswith("language_model."):
            assert HF_VISION.to_theirs(HF_VISION.to_ours(legacy)) == legacy
    for k in keys(built.original_dir):
        assert ORIGINAL.to_theirs(ORIGINAL.to_ours(k)) == k
        if case.text == "internlm2" and k.startswith("language_model."):
            assert INTERNLM2.to_theirs(INTERNLM2.to_ours(k)) == k
    if case.text == "internlm2":
        assert INTERNLM2.to_ours("language_model.model.layers.0.attention.wqkv.weight") == \
            "language_model.model.layers.0.self_attn.wqkv.weight"


def test_anchors_and_row_order():
    t = Renames([("^a.", "^x."), (".b.c.", ".y."), (".b.", ".z."), (".e$", ".w$")])
    assert t.to_ours("a.b.c.e") == "x.y.w"
    assert t.to_ours("q.a.b.e.f") == "q.a.z.e.f"  # `^a.` and `.e$` only at their ends
    assert t.to_theirs("x.y.w") == "a.b.c.e"
    assert t.to_theirs("x.z.d") == "a.b.d"

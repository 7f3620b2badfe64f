"""Export back to Hugging Face: what transformers (and the reference, for the original layout) loads from it computes
what the MLX model computes, and export(convert(x)) gives back x's tensors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file
from test_parity import GPT_OSS, INTERNLM2, PHI3, QWEN2, QWEN3_MOE, Spec, make_inputs

import mlx_internvl
from builders import Case
from mlx_internvl.config import config_from_hf
from mlx_internvl.convert import convert
from mlx_internvl.convert.export import export_hf
from mlx_internvl.errors import UserError
from mlx_internvl.loading import load_model
from mlx_internvl.parity import compare, mlx_stages
from mlx_internvl.reference import ReferenceModel

CASES = {
    "qwen2": QWEN2,
    "internlm2": INTERNLM2,
    "qwen3_moe": QWEN3_MOE,
    "phi3": PHI3,
    "gpt_oss": GPT_OSS,
    "tied": Case("m_tied", tie=True),
    "vit6b-sel-2": Case("m_exp_vit6b", vision="6b", select_layer=-2, text="internlm2", template="internlm2-chat"),
}


def tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:6]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("name", list(CASES))
def test_export_of_convert_gives_back_the_checkpoint(build_case, tmp_path, name):
    """Both directions, both layouts: names, dtypes and values bit for bit (InternLM2 `wqkv` regrouped, MoE
    experts unstacked, `mlp1.0/1/3`, conv back to OIHW, -hf q/k/v split again)."""
    built = build_case(CASES[name])
    for layout, src in (("original", built.original_dir), ("hf", built.hf_dir)):
        mlx_dir = convert(src, tmp_path / f"{layout}-mlx")
        out = export_hf(mlx_dir, tmp_path / f"{layout}-export", layout=layout)
        assert_same_tensors(tensors(src), tensors(out))
        # The configs describe the same model: reading either gives the same ModelConfig.
        ours = config_from_hf(json.loads((out / "config.json").read_text())).to_dict()
        theirs = config_from_hf(json.loads((src / "config.json").read_text())).to_dict()
        for d in (ours, theirs):
            d["llm_config"].pop("tie_word_embeddings", None)  # decided by the tensors on load, not the config
            d.pop("image_token_id")
        assert ours == theirs
        assert (out / "tokenizer.json").exists()


@pytest.mark.parametrize("name", list(CASES))
def test_exported_checkpoints_load_in_transformers_and_match(build_case, tmp_path, name):
    """-hf export: `InternVLForConditionalGeneration.from_pretrained`; original export: the reference's loader
    (the official converter's mapping onto transformers). Logits within 1e-4 of the MLX model, same 16 tokens."""
    built = build_case(CASES[name])
    mlx_dir = convert(built.original_dir, tmp_path / "mlx")
    model, _ = load_model(mlx_dir)
    assert model.image_token_id == built.image_token_id  # settled from the tokenizer on conversion
    ids, pixels = make_inputs(built, Spec(built.case))
    ours = mlx_stages(model, mx.array(ids), mx.array(pixels), 16)
    for layout in ("hf", "original"):
        out = export_hf(mlx_dir, tmp_path / layout, layout=layout)
        ref = ReferenceModel.from_pretrained(out, device="cpu", image_token_id=built.image_token_id)
        report = compare(ref.run_stages(ids, pixels, 16), ours)
        assert report["vision_features"]["max_abs"] < 1e-5, (layout, report["vision_features"])
        assert report["logits"]["max_abs"] < 1e-4, (layout, report["logits"])
        assert report["greedy_tokens"]["agree"] == 16, (layout, report["greedy_tokens"])


def test_quantized_model_exports_dequantized(build_case, tmp_path):
    """An 8-bit MLX model exported to -hf: transformers on the dequantized weights computes what the quantized MLX
    model computes."""
    built = build_case(QWEN2)
    q_dir = convert(built.original_dir, tmp_path / "q8", quantize_model=True, q_bits=8, q_group_size=32)
    model, _ = load_model(q_dir)
    assert model.image_token_id == built.image_token_id
    out = export_hf(q_dir, tmp_path / "hf", layout="hf", dtype="float32")
    exported = tensors(out)
    assert not any(k.endswith((".scales", ".biases")) for k in exported)
    assert {v.dtype for v in exported.values()} == {np.dtype("float32")}
    ids, pixels = make_inputs(built, Spec(built.case))
    ref = ReferenceModel.from_pretrained(out, device="cpu").run_stages(ids, pixels, 16)
    report = compare(ref, mlx_stages(model, mx.array(ids), mx.array(pixels), 16))
    assert report["logits"]["max_abs"] < 1e-4, report["logits"]
    assert report["greedy_tokens"]["agree"] == 16


def test_export_of_a_model_in_memory(build_case, tmp_path):
    """The path LoRA fusing takes: `export_hf(model, out_dir, layout=...)` on a loaded model; tokenizer files come
    from the directory it was loaded from."""
    built = build_case(INTERNLM2)
    model, _ = mlx_internvl.load(built.original_dir)
    out = export_hf(model, tmp_path / "orig", layout="original", dtype="bfloat16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["llm_config"]["architectures"] == ["InternLM2ForCausalLM"] and cfg["llm_config"]["bias"] is False
    exported = mx.load(str(out / "model.safetensors"))
    assert any(k.endswith("attention.wqkv.weight") for k in exported)
    assert {v.dtype for v in exported.values()} == {mx.bfloat16}
    assert (out / "tokenizer.json").exists()
    # Reading the export back gives the model's own parameters, rounded to bf16.
    back, _ = load_model(out)
    mine = dict(tree_flatten(model.parameters()))
    for key, value in tree_flatten(back.parameters()):
        assert mx.array_equal(value, mine[key].astype(mx.bfloat16)).item(), key


def test_export_refusals(build_case, tmp_path):
    v1 = build_case(Case("m_psv1", ps_version="v1", text="internlm2", template="internlm2-chat"))
    mlx_dir = convert(v1.original_dir, tmp_path / "v1")
    with pytest.raises(UserError, match="ps_version 'v1'.*--layout original"):
        export_hf(mlx_dir, tmp_path / "hf", layout="hf")
    assert not (tmp_path / "hf").exists()
    export_hf(mlx_dir, tmp_path / "orig", layout="original")
    assert json.loads((tmp_path / "orig" / "config.json").read_text())["ps_version"] == "v1"
    with pytest.raises(UserError, match="already exists"):
        export_hf(mlx_dir, tmp_path / "orig", layout="original")
    with pytest.raises(UserError, match="not an MLX directory"):
        export_hf(v1.original_dir, tmp_path / "x")
    with pytest.raises(UserError, match="layout 'gguf'"):
        export_hf(mlx_dir, tmp_path / "x", layout="gguf")
    assert not (tmp_path / "x").exists()


def test_export_cli(build_case, tmp_path):
    built = build_case(QWEN2)
    mlx_dir = convert(built.original_dir, tmp_path / "mlx")
    exe = shutil.which("mlx-internvl")
    ok = subprocess.run([exe, "export", str(mlx_dir), str(tmp_path / "hf"), "--layout", "hf"],
                        capture_output=True, text=True, timeout=180)
    assert ok.returncode == 0, ok.stderr
    assert "Wrote" in ok.stdout and (tmp_path / "hf" / "config.json").exists()
    bad = subprocess.run([exe, "export", str(mlx_dir), str(tmp_path / "hf"), "--layout", "hf"],
                         capture_output=True, text=True, timeout=180)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'hf'} already exists. Delete it or pass --force to replace it."]

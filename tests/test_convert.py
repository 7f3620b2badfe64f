"""The converter: both layouts give the same MLX tensors, quantized output stays close, bad checkpoints fail cleanly.

Conversions here go through the `mlx-internvl` command (in-process where only the result matters, in a subprocess
where the one-line error and exit status are the point).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from test_parity import INTERNLM2, PHI3, QWEN2, QWEN3_MOE, Spec, make_inputs

from builders import Case
from mlx_internvl.cli.main import main as cli_main
from mlx_internvl.convert.export import float_weights
from mlx_internvl.errors import CheckpointError, UserError
from mlx_internvl.loading import load_model
from mlx_internvl.weights import build_model

BACKBONES = {
    "qwen2": QWEN2,
    "qwen3": Case("m_qwen3", text="qwen3"),
    "qwen3_moe": QWEN3_MOE,
    "llama": Case("m_llama", text="llama", template="Hermes-2"),
    "internlm2": INTERNLM2,
    "phi3": PHI3,
    "vit6b": Case("m_vit6b", vision="6b", text="internlm2", template="internlm2-chat"),
}


def run_cli(*args: str) -> None:
    """`mlx-internvl ARGS` in this process; fails the test on a non-zero exit."""
    try:
        cli_main([str(a) for a in args])
    except SystemExit as e:
        assert e.code in (0, None), f"mlx-internvl {' '.join(map(str, args))} exited with {e.code}"


def read_mlx_dir(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        tensors, meta = mx.load(str(f), return_metadata=True)
        assert meta.get("format") == "mlx"
        out.update(tensors)
    return out


def leftovers(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_both_layouts_convert_to_identical_tensors(build_case, tmp_path, name):
    built = build_case(BACKBONES[name])
    run_cli("convert", built.original_dir, tmp_path / "from-original")
    run_cli("convert", built.hf_dir, tmp_path / "from-hf")
    a, b = read_mlx_dir(tmp_path / "from-original"), read_mlx_dir(tmp_path / "from-hf")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert mx.array_equal(a[key], b[key]).item(), key
    # The result loads strictly (every parameter present, nothing extra) from either directory.
    for d in ("from-original", "from-hf"):
        load_model(tmp_path / d)
    cfg_a = json.loads((tmp_path / "from-original" / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "from-hf" / "config.json").read_text())
    assert cfg_a["llm_config"]["model_type"] == cfg_b["llm_config"]["model_type"]
    assert (tmp_path / "from-original" / "tokenizer.json").exists()


def _logits(model, ids, pixels, image_token_id):
    assert model.image_token_id == image_token_id  # settled from the tokenizer when the checkpoint was read
    return np.array(model(mx.array(ids), mx.array(pixels)).astype(mx.float32))


@pytest.mark.parametrize("name", ["qwen2", "qwen3_moe"])
def test_quantized_output_loads_and_stays_close(build_case, tmp_path, name):
    """Group size 32 divides every input width of the tiny models (64 and 96), so every LLM linear and the
    embedding are quantized (64 would skip the 96-wide down_proj, as mlx-lm's predicate does)."""
    built = build_case(BACKBONES[name])
    ids, pixels = make_inputs(built, Spec(built.case, text=40))
    fp32, _ = load_model(built.original_dir, dtype="float32")
    ref = _logits(fp32, ids, pixels, built.image_token_id)
    errors = {}
    for bits in (4, 8):
        out = tmp_path / f"q{bits}"
        run_cli("convert", built.original_dir, out, "-q", "--q-bits", bits, "--q-group-size", 32)
        model, _ = load_model(out)
        assert model.config.quantization["bits"] == bits
        lm = model.language_model
        floats = [p for p, m in lm.named_modules() if type(m) in (nn.Linear, nn.Embedding)]
        assert floats == [], floats
        vision = [m for _, m in model.vision_model.named_modules() if isinstance(m, nn.Linear)]
        assert vision and all(m.weight.dtype == mx.float32 for m in vision)
        got = _logits(model, ids, pixels, built.image_token_id)
        # The quantized model computes exactly what a float model with the dequantized weights computes.
        deq = build_model(model.config.__class__.from_dict({**model.config.to_dict(), "quantization": None}))
        deq.load_weights(list(float_weights(model).items()), strict=True)
        assert np.abs(_logits(deq, ids, pixels, built.image_token_id) - got).max() < 1e-4
        err = float(np.abs(got - ref).max())
        rel_rms = float(np.sqrt(((got - ref) ** 2).mean() / (ref**2).mean()))
        agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
        errors[bits] = rel_rms
        print(f"{name} {bits}-bit g32: logits max-abs {err:.3f} (|ref| max {np.abs(ref).max():.1f}), "
              f"relative RMS {rel_rms:.4f}, argmax agreement {agree:.2f}")
    assert errors[8] < 0.05
    assert errors[4] < 0.75
    # Four fewer bits: about 16x the error (2^4), as for a single quantized matmul.
    assert 6 < errors[4] / errors[8] < 40


# ---- bad checkpoints ----

def _sharded(src: Path, dst: Path, n: int = 3) -> Path:
    """Copy of `src` with its tensors spread over `n` shards and an index."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(str(src / "model.safetensors"))
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.array(keys, dtype=object), n)):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _corrupt(d: Path) -> str:
    (d / "model-00002-of-00003.safetensors").write_bytes(os.urandom(4096))
    return "model-00002-of-00003.safetensors"


def _truncated(d: Path) -> str:
    f = d / "model-00003-of-00003.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    return "model-00003-of-00003.safetensors"


def _missing_shard(d: Path) -> str:
    (d / "model-00002-of-00003.safetensors").unlink()
    return "model-00002-of-00003.safetensors"


def _index_names_absent_tensor(d: Path) -> str:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    key = next(k for k, v in index["weight_map"].items() if v == "model-00003-of-00003.safetensors")
    index["weight_map"][key] = "model-00001-of-00003.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return key


def _config_mismatch(d: Path) -> str:
    cfg = json.loads((d / "config.json").read_text())
    cfg["llm_config"]["hidden_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    return "model-0000"  # some shard, and the shape found vs implied


BAD = {
    "corrupt": (_corrupt, ["model-00002-of-00003.safetensors"]),
    "truncated": (_truncated, ["model-00003-of-00003.safetensors", "Tensor '"]),
    "missing-shard": (_missing_shard, ["model-00002-of-00003.safetensors", "missing", "e.g. '"]),
    "index-names-absent-tensor": (_index_names_absent_tensor, ["model-00001-of-00003.safetensors", "does not"]),
    "config-mismatch": (_config_mismatch, ["config-mismatch/config.json", ".safetensors:language_model.",
                                           "has shape (282, 64), the config implies (282, 48)"]),
}


@pytest.fixture(scope="module")
def bad_checkpoints(build_case, tmp_path_factory):
    """One sharded copy of the qwen2 checkpoint per kind of damage; returns {kind: (dir, extra expected text)}."""
    root = tmp_path_factory.mktemp("bad")
    built = build_case(QWEN2)
    out = {}
    for kind, (damage, _) in BAD.items():
        d = _sharded(built.original_dir, root / kind)
        out[kind] = (d, damage(d))
    return out


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_checkpoint_error_names_file_and_key_and_leaves_nothing(bad_checkpoints, tmp_path, kind):
    src, detail = bad_checkpoints[kind]
    out = tmp_path / "out" / "mlx"
    from mlx_internvl.convert import convert

    with pytest.raises(CheckpointError) as info:
        convert(src, out)
    message = str(info.value)
    for text in BAD[kind][1] + [detail]:
        assert text in message, (kind, text, message)
    assert not out.exists()
    assert not out.parent.exists() or leftovers(out.parent) == []


def test_cli_errors_are_one_line_exit_1_no_traceback(bad_checkpoints, tmp_path):
    """Every kind of damage through the real console script, in parallel subprocesses (each one imports mlx)."""
    exe = shutil.which("mlx-internvl") or sys.argv[0]
    procs = {}
    for kind, (src, _) in bad_checkpoints.items():
        procs[kind] = subprocess.Popen([exe, "convert", str(src), str(tmp_path / kind)], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    existing = tmp_path / "exists"
    existing.mkdir()
    procs["exists"] = subprocess.Popen([exe, "convert", str(bad_checkpoints["corrupt"][0]), str(existing)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors = {}
    for kind, p in procs.items():
        stdout, stderr = p.communicate(timeout=180)
        assert p.returncode == 1, (kind, stdout, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (kind, stderr)
        assert "Traceback" not in stderr + stdout
        errors[kind] = lines[0]
        if kind != "exists":
            assert not (tmp_path / kind).exists()
    assert "already exists. Delete it or pass --force" in errors["exists"]
    assert "model-00003-of-00003.safetensors" in errors["truncated"]
    assert leftovers(tmp_path) == []


def test_force_replaces_atomically(build_case, tmp_path, bad_checkpoints):
    from mlx_internvl.convert import convert

    built = build_case(QWEN2)
    out = tmp_path / "mlx"
    convert(built.original_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="already exists. Delete it or pass --force"):
        convert(built.hf_dir, out)
    # A forced conversion that fails leaves the old output exactly as it was.
    with pytest.raises(CheckpointError):
        convert(bad_checkpoints["truncated"][0], out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []
    # A forced conversion that succeeds replaces it completely.
    convert(built.hf_dir, out, dtype="bfloat16", force=True)
    weights = read_mlx_dir(out)
    assert {w.dtype for w in weights.values()} == {mx.bfloat16}
    assert leftovers(tmp_path) == []


# ---- the MLX directory itself ----

@pytest.fixture(scope="module")
def mlx_dir(build_case, tmp_path_factory):
    from mlx_internvl.convert import convert

    return convert(build_case(QWEN2).original_dir, tmp_path_factory.mktemp("mlxdir") / "mlx")


def _rewrite(src: Path, dst: Path, edit, metadata=(("format", "mlx"),)):
    shutil.copytree(src, dst)
    tensors = mx.load(str(dst / "model.safetensors"))
    edit(tensors)
    mx.save_safetensors(str(dst / "model.safetensors"), tensors, metadata=dict(metadata))
    return dst


def test_mlx_dir_loads_strictly(mlx_dir, tmp_path):
    model, _ = load_model(mlx_dir)
    assert model.source_path == mlx_dir
    extra = _rewrite(mlx_dir, tmp_path / "extra",
                     lambda t: t.update({"language_model.model.extra.weight": mx.zeros(3)}))
    with pytest.raises(CheckpointError,
                       match=r"unexpected 1 tensors: language_model\.model\.extra\.weight \(from model\.safetensors\)"):
        load_model(extra)
    missing = _rewrite(mlx_dir, tmp_path / "missing", lambda t: t.pop("language_model.model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensors: language_model\.model\.norm\.weight"):
        load_model(missing)
    wrong = _rewrite(mlx_dir, tmp_path / "wrong", lambda t: t.update({"mlp1.linear_2.bias": mx.zeros(5)}))
    with pytest.raises(CheckpointError, match=r"mlp1\.linear_2\.bias \(from model\.safetensors\) has shape \(5,\)"):
        load_model(wrong)


def test_mlx_dir_refuses_files_without_the_format_marker(mlx_dir, tmp_path):
    unmarked = _rewrite(mlx_dir, tmp_path / "unmarked", lambda t: None, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: no 'format: mlx' marker"):
        load_model(unmarked)
    old = tmp_path / "old-version"
    shutil.copytree(mlx_dir, old)
    cfg = json.loads((old / "config.json").read_text())
    cfg["mlx_internvl_format"] = 99
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="format version 99"):
        load_model(old)


def test_convert_refuses_mlx_input_and_bad_options(mlx_dir, tmp_path):
    from mlx_internvl.convert import convert

    with pytest.raises(UserError, match="already an MLX model"):
        convert(mlx_dir, tmp_path / "again")
    with pytest.raises(UserError, match="--q-group-size 48"):
        convert(mlx_dir, tmp_path / "again", quantize_model=True, q_group_size=48)
    assert not (tmp_path / "again").exists()

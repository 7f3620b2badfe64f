"""Checkpoints made by mlx-vlm's converter (the mlx-community InternVL repos) load as they are.

The fixtures in tests/fixtures/mlx_vlm were written by mlx-vlm 0.7.10 itself (`make_fixtures.py` there) from the
seeded checkpoints of tests/builders.py. Each test rebuilds the same source, converts it with mlx-internvl and
compares: float fixtures must give the same tensors and logits bit for bit; quantized ones must hold exactly
`mx.quantize` of the float weights and give the logits of the float model whose weights are replaced by their
dequantized values, so quantization is the only difference from float.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_convert import run_cli
from test_parity import Spec, make_inputs

from mlx_internvl.convert import convert
from mlx_internvl.errors import CheckpointError, UserError
from mlx_internvl.loading import load_model

FIXTURES = Path(__file__).parent / "fixtures" / "mlx_vlm"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
_spec = importlib.util.spec_from_file_location("make_mlx_vlm_fixtures", FIXTURES / "make_fixtures.py")
make_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_fixtures)

LAYOUTS = list(make_fixtures.SOURCES)  # internvl_chat (original source), internvl (-hf source)
GROUP = 64  # mlx-vlm's default group size, used for the fixtures


@pytest.fixture(scope="module")
def sources(build_case, tmp_path_factory):
    """layout -> (built source, our own bf16 conversion of it)."""
    out = {}
    root = tmp_path_factory.mktemp("ours")
    for layout in LAYOUTS:
        built = build_case(make_fixtures.source_case(layout))
        src = make_fixtures.source_dir(built, layout)
        digest = make_fixtures.tensor_digest(src)
        assert digest == MANIFEST["sources"][layout]["tensor_sha256"], (
            f"tests/builders.py now builds a different {layout} source than the one the mlx-vlm fixtures were made "
            "from; regenerate them with tests/fixtures/mlx_vlm/make_fixtures.py")
        out[layout] = (built, convert(src, root / layout, dtype="bfloat16"))
    return out


def logits(model, built, dtype=mx.float32):
    ids, pixels = make_inputs(built, Spec(built.case, text=24))
    assert model.image_token_id == built.image_token_id
    return np.array(model(mx.array(ids), mx.array(pixels).astype(dtype)).astype(mx.float32))


def quantized_paths(model) -> list:
    return sorted(p for p, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float_checkpoint_equals_our_conversion(sources, layout, caplog):
    built, ours_dir = sources[layout]
    with caplog.at_level("INFO", logger="mlx_internvl"):
        theirs, _ = load_model(FIXTURES / f"{layout}-bf16")
    assert f"read as mlx-vlm {layout} layout" in caplog.text
    ours, _ = load_model(ours_dir)
    a, b = dict(tree_flatten(theirs.parameters())), dict(tree_flatten(ours.parameters()))
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == mx.bfloat16 and a[key].dtype == b[key].dtype, key
        assert mx.array_equal(a[key], b[key]).item(), key
    got, ref = logits(theirs, built, mx.bfloat16), logits(ours, built, mx.bfloat16)
    assert np.isfinite(got).all() and np.array_equal(got, ref)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantized_checkpoint_is_our_float_model_quantized(sources, layout, bits):
    built, ours_dir = sources[layout]
    theirs, _ = load_model(FIXTURES / f"{layout}-{bits}bit", dtype="float32")
    assert theirs.config.quantization == {"group_size": GROUP, "bits": bits, "mode": "affine"}
    ours, _ = load_model(ours_dir, dtype="float32")
    float_params = dict(tree_flatten(ours.parameters()))
    paths = quantized_paths(theirs)
    # Read from the .scales tensors: the language model's linear layers whose input width is a multiple of 64 and
    # the embedding; internvl_chat's mlp1 too (mlx-vlm does not count it as a vision module); never the ViT.
    assert "language_model.model.embed_tokens" in paths
    assert not any(p.startswith("vision_model") for p in paths)
    assert not any(p.endswith("down_proj") for p in paths)  # input width 96
    assert any(p.startswith("mlp1.") for p in paths) == (layout == "internvl_chat")
    deq = {}
    for path in paths:
        module = _submodule(theirs, path)
        w = float_params[f"{path}.weight"].astype(mx.bfloat16)
        q, scales, biases = mx.quantize(w, group_size=GROUP, bits=bits)
        assert mx.array_equal(module.weight, q).item(), path
        assert mx.array_equal(module.scales, scales.astype(mx.float32)).item(), path
        assert mx.array_equal(module.biases, biases.astype(mx.float32)).item(), path
        deq[f"{path}.weight"] = mx.dequantize(module.weight, module.scales, module.biases, group_size=GROUP,
                                              bits=bits)
    float_logits = logits(ours, built)
    # The quantized model is the float model with dequantized weights, to float32 summation order.
    ours.load_weights(list(deq.items()), strict=False)
    got, ref = logits(theirs, built), logits(ours, built)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    # And against the float model itself, the error quantization causes (figures in docs/convert.md).
    rel_rms = float(np.sqrt(((got - float_logits) ** 2).mean() / (float_logits ** 2).mean()))
    print(f"{layout} {bits}-bit: logits relative RMS error vs float {rel_rms:.3f}, argmax agreement "
          f"{(got.argmax(-1) == float_logits.argmax(-1)).mean():.2f}")
    assert rel_rms < {8: 0.1, 4: 1.0}[bits]


def _submodule(model, path):
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


@pytest.mark.parametrize("layout", LAYOUTS)
def test_convert_reads_mlx_vlm_checkpoints(tmp_path, layout):
    """`convert` takes an mlx-vlm directory as its source; the result is our layout with the same tensors."""
    run_cli("convert", FIXTURES / f"{layout}-4bit", tmp_path / "out")
    a, _ = load_model(FIXTURES / f"{layout}-4bit")
    b, _ = load_model(tmp_path / "out")
    assert b.config.quantization["bits"] == 4
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert sorted(pa) == sorted(pb) and all(mx.array_equal(pa[k], pb[k]).item() for k in pa)
    with pytest.raises(UserError, match="already quantized"):
        convert(FIXTURES / f"{layout}-4bit", tmp_path / "again", quantize_model=True)


def test_verbose_names_the_layout(tmp_path, capsys):
    """`generate --verbose` says which layout was read, for each kind of directory."""
    for d, expected in [(FIXTURES / "internvl-8bit", "mlx-vlm internvl layout"),
                        (FIXTURES / "internvl_chat-bf16", "mlx-vlm internvl_chat layout")]:
        run_cli("generate", "--model", d, "--prompt", "hi", "--max-tokens", "2", "--verbose")
        assert expected in capsys.readouterr().err


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def test_mixed_weight_files_are_refused(tmp_path):
    d = _copy("internvl_chat-bf16", tmp_path)
    tensors = mx.load(str(d / "model.safetensors"))
    keys = sorted(tensors)
    half = len(keys) // 2
    mx.save_safetensors(str(d / "model-00001-of-00002.safetensors"), {k: tensors[k] for k in keys[:half]},
                        metadata={"format": "mlx"})
    mx.save_safetensors(str(d / "model-00002-of-00002.safetensors"), {k: tensors[k] for k in keys[half:]},
                        metadata={"format": "pt"})
    (d / "model.safetensors").unlink()
    index = {"weight_map": {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: .*no 'format: mlx' marker"):
        load_model(d)


def test_quantization_block_without_mlx_weights_is_refused(tmp_path, sources):
    built, _ = sources["internvl_chat"]
    d = tmp_path / "fake"
    shutil.copytree(built.original_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization"] = {"group_size": 64, "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no 'format: mlx' marker"):
        load_model(d)


def test_unknown_quantization_mode_is_refused(tmp_path):
    d = _copy("internvl-4bit", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization"]["mode"] = "awq-int4"
    cfg.pop("quantization_config")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quantization mode 'awq-int4'"):
        load_model(d)


def test_quantized_separate_vision_qkv_is_refused(tmp_path):
    """A -hf layout whose ViT q/k/v were quantized (not mlx-vlm's default) cannot be fused: named, not misread."""
    d = _copy("internvl-4bit", tmp_path)
    tensors, meta = mx.load(str(d / "model.safetensors"), return_metadata=True)
    key = "vision_tower.encoder.layer.0.attention.q_proj"
    q, s, b = mx.quantize(tensors[f"{key}.weight"], group_size=32, bits=4)
    tensors.update({f"{key}.weight": q, f"{key}.scales": s, f"{key}.biases": b})
    mx.save_safetensors(str(d / "model.safetensors"), tensors, metadata=meta)
    (d / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=f"{key}.scales is quantized"):
        load_model(d)

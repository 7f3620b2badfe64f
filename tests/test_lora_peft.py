"""Adapters leave MLX in forms others can use: PEFT adapters on transformers' own InternVL give our logits, and a
fused model (MLX, or a Hugging Face checkpoint loaded by transformers) equals base + adapter."""

import copy

import mlx.core as mx
import numpy as np
import pytest
from conftest import ASSETS

import mlx_internvl
from builders import Case
from mlx_internvl.adapters import CONFIG_FILE, adapter_modules
from mlx_internvl.files import save_json
from mlx_internvl.lora import LoraConfig, apply_lora, export_peft, fuse, fuse_adapters, save_adapters

VARIANTS = {
    # name: (case, LoRA layout)
    "qwen2_lora_vision_projector": (Case("lora_peft_qwen2"), LoraConfig(rank=4, alpha=12, train_vision=True,
                                                                      train_projector="lora")),
    "qwen2_dora_vision_full_projector": (Case("lora_peft_qwen2"), LoraConfig(rank=3, alpha=6, dora=True,
                                                                           train_vision=True, train_projector="full")),
    "phi3_fused_qkv_lora": (Case("lora_peft_phi3", text="phi3", template="phi3-chat"),
                            LoraConfig(rank=4, alpha=4, targets=["qkv_proj", "gate_up_proj", "o_proj"])),
}


def randomize_adapters(model, seed: int) -> None:
    """Non-zero, seeded values for every trainable tensor (a fresh LoRA has B = 0 and would prove nothing)."""
    from mlx.utils import tree_flatten, tree_unflatten

    key = mx.random.key(seed)
    new = []
    for i, (name, v) in enumerate(sorted(tree_flatten(model.trainable_parameters()))):
        noise = mx.random.normal(v.shape, key=mx.random.split(key, 1000)[i])
        if name.endswith(".m"):
            new.append((name, v * (1 + 0.2 * noise)))
        elif name.endswith(("lora_a", "lora_b")):
            new.append((name, 0.05 * noise))
        else:
            new.append((name, v + 0.1 * noise))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


def adapted(built, lora: LoraConfig, out_dir, seed=0):
    model, proc = mlx_internvl.load(built.hf_dir, dtype="float32")
    apply_lora(model, lora)
    randomize_adapters(model, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_adapters(model, out_dir)
    save_json(out_dir / CONFIG_FILE, lora.to_json(base_model=str(built.hf_dir)))
    model.eval()
    return model, proc


def inputs(proc):
    return proc("Describe it.", images=[ASSETS / "images" / "image1.jpg"], max_tiles=1)


def mlx_logits(model, inp):
    return np.array(model(inp["input_ids"], pixel_values=inp["pixel_values"]).astype(mx.float32))


def torch_logits(hf_model, inp):
    import torch

    ids = torch.from_numpy(np.array(inp["input_ids"]).astype(np.int64))
    pv = torch.from_numpy(np.array(inp["pixel_values"])).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        return hf_model(input_ids=ids, pixel_values=pv).logits.float().numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_peft_adapter_on_transformers_matches_mlx(build_case, tmp_path, variant):
    from peft import PeftModel

    case, lora = VARIANTS[variant]
    built = build_case(case)
    model, proc = adapted(built, copy.deepcopy(lora), tmp_path / "ad")
    inp = inputs(proc)
    ours = mlx_logits(model, inp)
    peft_dir = export_peft(tmp_path / "ad", tmp_path / "peft")
    reference = PeftModel.from_pretrained(copy.deepcopy(built.model), str(peft_dir)).eval()
    theirs = torch_logits(reference, inp)
    base = torch_logits(built.model, inp)
    assert np.abs(theirs - base).max() > 0.05  # the adapter really changes the output
    assert np.abs(ours - theirs).max() < 1e-4, np.abs(ours - theirs).max()


def test_fused_model_equals_base_plus_adapter_and_round_trips(build_case, tmp_path):
    built = build_case(VARIANTS["qwen2_dora_vision_full_projector"][0])
    model, proc = adapted(built, LoraConfig(rank=4, alpha=8, train_vision=True, train_projector="lora"),
                          tmp_path / "ad", seed=1)
    inp = inputs(proc)
    with_adapter = mlx_logits(model, inp)
    fuse_adapters(model)
    assert adapter_modules(model) == []
    assert np.abs(mlx_logits(model, inp) - with_adapter).max() < 1e-4
    written = fuse(built.hf_dir, tmp_path / "ad", tmp_path / "fused", dtype="float32")
    fused, proc2 = mlx_internvl.load(written["mlx"], dtype="float32")
    assert np.abs(mlx_logits(fused, inp) - with_adapter).max() < 1e-4
    loaded, _ = mlx_internvl.load(built.hf_dir, dtype="float32", adapter_path=tmp_path / "ad")
    assert np.abs(mlx_logits(loaded, inp) - with_adapter).max() == 0.0


def test_qlora_fuse_with_dequantize_equals_quantized_base_plus_adapter(build_case, tmp_path):
    from mlx_internvl.lora.fuse import save_mlx_model
    from mlx_internvl.weights import quantize

    built = build_case(VARIANTS["qwen2_lora_vision_projector"][0])
    base, proc = mlx_internvl.load(built.hf_dir, dtype="float32")
    base.config.quantization = quantize(base, 8, 32)
    qdir = save_mlx_model(base, built.hf_dir, tmp_path / "q8")
    model, proc = mlx_internvl.load(qdir)
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    assert any(type(m.linear).__name__ == "QuantizedLinear" for _, m in adapter_modules(model))
    randomize_adapters(model, 2)
    save_adapters(model, tmp_path / "ad")
    save_json(tmp_path / "ad" / CONFIG_FILE, LoraConfig(rank=4, alpha=8).to_json())
    model.eval()
    inp = inputs(proc)
    with_adapter = mlx_logits(model, inp)
    written = fuse(qdir, tmp_path / "ad", tmp_path / "fused", dequantize=True)
    fused, _ = mlx_internvl.load(written["mlx"])
    assert fused.config.quantization is None
    assert not any("QuantizedLinear" in type(m).__name__ for _, m in fused.named_modules())
    assert np.abs(mlx_logits(fused, inp) - with_adapter).max() < 1e-4


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_fused_hf_export_equals_base_plus_peft_adapter_in_transformers(build_case, tmp_path, layout):
    """The fused checkpoint, loaded by transformers, computes what transformers' base model + the PEFT adapter
    computes (one engine on both sides, so only the fusing is compared)."""
    from peft import PeftModel

    from mlx_internvl.reference import ReferenceModel

    built = build_case(VARIANTS["qwen2_lora_vision_projector"][0])
    model, proc = adapted(built, LoraConfig(rank=4, alpha=8, train_vision=True, train_projector="full"),
                          tmp_path / "ad", seed=3)
    inp = inputs(proc)
    written = fuse(built.hf_dir, tmp_path / "ad", tmp_path / "hf", export_hf=layout, export_peft=tmp_path / "peft",
                   dtype="float32")
    fused = ReferenceModel.from_pretrained(written["hf"], device="cpu", image_token_id=built.image_token_id).model
    with_peft = PeftModel.from_pretrained(copy.deepcopy(built.model), str(written["peft"])).eval()
    a, b = torch_logits(fused, inp), torch_logits(with_peft, inp)
    assert np.abs(a - torch_logits(built.model, inp)).max() > 0.05
    assert np.abs(a - b).max() < 1e-4, np.abs(a - b).max()
    assert np.abs(a - mlx_logits(model, inp)).max() < 2e-4  # across engines: the base model's own fp32 parity

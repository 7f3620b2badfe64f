"""Adapters in PEFT's format, for transformers' `InternVLForConditionalGeneration` (`-hf` layout).

mlx-lm's `LoRALinear` computes `y = W x + scale * (x @ A) @ B` with `A = lora_a [in, r]`, `B = lora_b [r, out]`;
PEFT computes `y = W x + (alpha / r) * lora_B(lora_A(x))` with `lora_A.weight [r, in]`, `lora_B.weight [out, r]`.
So `lora_A = A^T`, `lora_B = B^T` and `lora_alpha = scale * r`, exactly. DoRA's magnitude `m [out]` is PEFT's
`lora_magnitude_vector` (both renormalise each output row of `W + scale * B^T A^T` and leave the bias unscaled).

Module names follow transformers: the LLM under `model.language_model.layers.N`, the ViT under
`model.vision_tower.encoder.layer.N.attention`. Our ViT keeps the fused `qkv` of the original checkpoints while
transformers splits it into `q_proj`, `k_proj`, `v_proj`; a rank-r update of the fused matrix is exactly three
rank-r updates sharing `lora_A`, with `lora_B` cut into thirds by output row (and `m` likewise). A fully trained
projector goes into `modules_to_save`. MoE expert adapters have no PEFT form (transformers stores the experts as
fused parameters, not Linear modules) and are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Optional, Union

import mlx.core as mx
import numpy as np
from safetensors.numpy import save_file

from ..adapters import ADAPTER_FILE, ROUTER_MODULES, read_adapter_config
from ..errors import UserError
from ..files import check_new_output, staged_output

PREFIX = "base_model.model."
MODULE_RULES = [
    (re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$"), "model.language_model.layers.{0}.{1}"),
    (re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj$"),
     "model.vision_tower.encoder.layer.{0}.attention.projection_layer"),
    (re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)$"),
     "model.vision_tower.encoder.layer.{0}.mlp.{1}"),
    (re.compile(r"^mlp1\.(linear_1|linear_2)$"), "model.multi_modal_projector.{0}"),
]
QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv$")
PROJECTOR_FULL = re.compile(r"^mlp1\.(layer_norm|linear_1|linear_2)\.(weight|bias)$")


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def hf_module_names(path: str):
    """Our module path -> list of (transformers module name, output-row slice or None)."""
    m = QKV.match(path)
    if m:
        base = f"model.vision_tower.encoder.layer.{m.group(1)}.attention."
        return [(base + n, i) for i, n in enumerate(("q_proj", "k_proj", "v_proj"))]
    for pattern, fmt in MODULE_RULES:
        m = pattern.match(path)
        if m:
            if "switch_mlp" in path:
                raise UserError(f"{path}: MoE expert adapters cannot be exported to PEFT (transformers keeps the "
                                "experts as fused parameters). Train without the expert layers in --targets.")
            return [(fmt.format(*m.groups()), None)]
    raise UserError(f"{path}: no transformers module corresponds to this adapter")


def peft_tensors(weights: Dict[str, mx.array]) -> tuple:
    """(PEFT state dict of numpy arrays, target module names, modules_to_save)."""
    groups: Dict[str, Dict[str, mx.array]] = {}
    tensors, full = {}, set()
    for key, value in weights.items():
        m = PROJECTOR_FULL.match(key)
        if m:
            tensors[f"{PREFIX}model.multi_modal_projector.{m.group(1)}.{m.group(2)}"] = _np(value)
            full.add("multi_modal_projector")
            continue
        if key.split(".", 1)[0] in ("mlp2",) + ROUTER_MODULES:
            raise UserError(f"{key}: trained by --train-flash, and transformers has no InternVL3.5-Flash model to "
                            "hold it, so there is no PEFT form. Merge the adapters with `mlx-internvl fuse "
                            "--export-hf original` instead (the original layout, with the trained router side).")
        path, leaf = key.rsplit(".", 1)
        if leaf not in ("lora_a", "lora_b", "m"):
            raise UserError(f"{key}: not a LoRA/DoRA tensor or projector weight; cannot export it to PEFT")
        groups.setdefault(path, {})[leaf] = value
    targets = []
    for path, parts in sorted(groups.items()):
        if "lora_a" not in parts or "lora_b" not in parts:
            raise UserError(f"{path}: the adapter file lacks lora_a or lora_b for this layer")
        a, b = _np(parts["lora_a"]).T, _np(parts["lora_b"]).T  # [r, in], [out, r]
        names = hf_module_names(path)
        rows = b.shape[0] // len(names)
        for name, i in names:
            cut = slice(None) if i is None else slice(i * rows, (i + 1) * rows)
            tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b[cut])
            if "m" in parts:
                tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = np.ascontiguousarray(_np(parts["m"])[cut])
            targets.append(name)
    return tensors, targets, sorted(full)


def export_peft(adapter_path: Union[str, Path], out_dir: Union[str, Path], base_model: Optional[str] = None,
                force: bool = False) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` that `peft.PeftModel.from_pretrained` loads onto
    transformers' InternVL model of the same base checkpoint."""
    adapter_dir = Path(adapter_path).expanduser()
    cfg = read_adapter_config(adapter_dir)
    out = Path(out_dir).expanduser()
    check_new_output(out, force)
    try:
        weights = mx.load(str(adapter_dir / ADAPTER_FILE))
    except Exception as e:  # mx.load raises RuntimeError/ValueError for a missing or damaged file
        raise UserError(f"{adapter_dir / ADAPTER_FILE}: cannot read ({e})") from e
    tensors, targets, to_save = peft_tensors(weights)
    rank, scale = int(cfg["rank"]), float(cfg.get("scale", cfg["alpha"] / cfg["rank"]))
    alpha = scale * rank
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": float(cfg.get("dropout", 0.0)),
        "target_modules": targets,
        "modules_to_save": to_save or None,
        "use_dora": bool(cfg.get("dora", False)),
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "base_model_name_or_path": base_model or cfg.get("base_model"),
    }
    with staged_output(out, force=True) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out

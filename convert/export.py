"""`mlx-internvl export`: an MLX model (or a model in memory, e.g. after LoRA fusing) back to a Hugging Face layout.

For CUDA users: the result loads with transformers (`layout="hf"`: `InternVLForConditionalGeneration`) or with the
checkpoint's own remote code (`layout="original"`: `InternVLChatModel`, `trust_remote_code=True`; the `*.py` files
are carried over from the source when it had them). Notable steps:
- quantized layers are dequantized (`mx.dequantize`, the values the quantized model computes with);
- original layout undoes every change `convert` made: InternLM2's grouped `wqkv` and names, per-expert MoE keys,
  GPT-OSS's fused, interleaved experts, `mlp1.0/1/3`, the torch conv layout;
- `-hf` layout writes what transformers' own `save_pretrained` writes (legacy prefixes `vision_tower.`,
  `language_model.model.`, per-expert MoE keys), which `from_pretrained` maps onto its current names;
- the output is written in a temporary sibling directory and renamed into place only when complete.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_internvl import model_card, publish
from mlx_internvl.config import HF_TEXT_ARCHITECTURES, LANGUAGE_MODELS, ModelConfig
from mlx_internvl.errors import UserError
from mlx_internvl.files import (
    LAYOUT_FILES,
    TOKENIZER_FILES,
    check_new_output,
    copy_model_files,
    save_json,
    save_weights,
    staged_output,
)
from mlx_internvl.weights import DTYPE_NAMES, cast_floats, load_mlx_model, parse_dtype, read_config

from .keymap import HF_VISION, INTERNLM2, ORIGINAL, conv_ohwi_to_oihw, join_gpt_oss_experts, join_wqkv

LAYOUTS = ("original", "hf")
def float_weights(model: nn.Module) -> Dict[str, mx.array]:
    """All parameters as a flat dict, quantized layers dequantized to `weight` (the model is not modified)."""
    flat = dict(tree_flatten(model.parameters()))
    for name, module in model.named_modules():
        if "scales" not in module or not hasattr(module, "bits"):
            continue
        prefix = f"{name}." if name else ""
        flat[prefix + "weight"] = mx.dequantize(module["weight"], module["scales"], module.get("biases"),
                                                module.group_size, module.bits, getattr(module, "mode", "affine"))
        flat.pop(prefix + "scales")
        flat.pop(prefix + "biases", None)
    return flat


def _unstack_experts(key: str, w: mx.array, out: Dict[str, mx.array]) -> bool:
    """`...mlp.switch_mlp.gate_proj.weight [E, I, H]` -> `...mlp.experts.E.gate_proj.weight` for every expert."""
    m = re.match(r"^(.*\.mlp)\.switch_mlp\.(\w+)\.weight$", key)
    if not m:
        return False
    for e in range(w.shape[0]):
        out[f"{m.group(1)}.experts.{e}.{m.group(2)}.weight"] = w[e]
    return True


def original_tensors(weights: Dict[str, mx.array], config: ModelConfig) -> Dict[str, mx.array]:
    """Our flat float weights -> the OpenGVLab key names and layouts (lazy; nothing is evaluated here)."""
    llm = config.llm_config
    internlm2 = config.source_llm_architecture == "InternLM2ForCausalLM"
    if config.model_type == "gpt_oss":
        weights = join_gpt_oss_experts(weights)
    out, qkv = {}, {}
    for key, w in weights.items():
        if key == "vision_model.embeddings.patch_embedding.weight":
            w = conv_ohwi_to_oihw(w)
        key = ORIGINAL.to_theirs(key)
        if key.startswith("language_model.") and _unstack_experts(key, w, out):
            continue
        if internlm2 and key.startswith("language_model."):
            m = re.match(r"^(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
            if m:
                qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = w
                continue
            key = INTERNLM2.to_theirs(key)
        out[key] = w
    h, kv = llm["num_attention_heads"], llm["num_key_value_heads"]
    d = llm.get("head_dim") or llm["hidden_size"] // h
    for (prefix, kind), parts in qkv.items():
        wqkv = join_wqkv(parts["q"], parts["k"], parts["v"], h, kv, d)
        out[INTERNLM2.to_theirs(f"{prefix}.self_attn.wqkv.{kind}")] = wqkv
    return out


def hf_tensors(weights: Dict[str, mx.array], config: ModelConfig) -> Dict[str, mx.array]:
    """Our flat float weights -> transformers' names (legacy prefixes) and layouts (lazy)."""
    if config.model_type == "gpt_oss":
        weights = join_gpt_oss_experts(weights)
    out = {}
    for key, w in weights.items():
        if key.startswith("language_model."):
            if not _unstack_experts(key, w, out):
                out[key] = w
            continue
        if key == "vision_model.embeddings.patch_embedding.weight":
            w = conv_ohwi_to_oihw(w)
        key = HF_VISION.to_theirs(key)
        m = re.match(r"^(.*\.attention)\.qkv\.(weight|bias)$", key)
        if m:
            # fused rows are [q | k | v], C each
            for name, part in zip("qkv", mx.split(w, 3, axis=0)):
                out[f"{m.group(1)}.{name}_proj.{m.group(2)}"] = part
            continue
        out[key] = w
    return out


def _rope_for_config(llm: dict) -> dict:
    """mlx-lm spells the scaling type twice (`type` and `rope_type`); configs for other loaders get one, `type`."""
    rs = llm.get("rope_scaling")
    if not rs:
        return {}
    rs = {k: v for k, v in rs.items() if k != "rope_type"}
    return {"rope_scaling": rs}


def original_config(config: ModelConfig, dtype_name: str, remote_code: bool) -> dict:
    llm = {k: v for k, v in config.llm_config.items() if k not in ("model_type", "rope_scaling")}
    arch = config.source_llm_architecture or HF_TEXT_ARCHITECTURES[config.model_type]
    llm.update(_rope_for_config(config.llm_config))
    if arch == "InternLM2ForCausalLM":
        llm["bias"] = bool(llm.pop("attention_bias", False))
        llm.pop("mlp_bias", None)
    llm.update(architectures=[arch], model_type=LANGUAGE_MODELS[arch].original_type, torch_dtype=dtype_name)
    vision = dict(config.vision_config.to_dict(), architectures=["InternVisionModel"], model_type="intern_vit_6b",
                  drop_path_rate=0.0, use_flash_attn=False, torch_dtype=dtype_name)
    out = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "downsample_ratio": config.downsample_ratio,
        "dynamic_image_size": config.dynamic_image_size,
        "force_image_size": config.force_image_size,
        "max_dynamic_patch": config.max_dynamic_patch,
        "min_dynamic_patch": config.min_dynamic_patch,
        "ps_version": config.ps_version,
        "select_layer": config.select_layer,
        "template": config.template,
        "use_thumbnail": config.use_thumbnail,
        "tie_word_embeddings": bool(llm.get("tie_word_embeddings", False)),
        "torch_dtype": dtype_name,
        "vision_config": vision,
        "llm_config": llm,
    }
    if remote_code:
        out["auto_map"] = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                           "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                           "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"}
    for key in ("system_message", "eos_token_id", "flash_mode", "flash_relative_threshold",
                "flash_absolute_threshold"):
        if getattr(config, key) is not None:
            out[key] = getattr(config, key)
    return out


def check_exportable(config: ModelConfig, layout: str) -> None:
    if layout not in LAYOUTS:
        raise UserError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if layout == "hf" and config.is_flash:
        raise UserError("transformers' InternVL has no Flash router (gating, mlp2); export this InternVL3.5-Flash "
                        "model with --layout original instead")
    if layout == "hf" and config.ps_version == "v1":
        raise UserError(
            "this model uses ps_version 'v1' (the InternVL 1.5 token order), which transformers' InternVL cannot "
            "represent; export it with --layout original instead"
        )


def hf_config(config: ModelConfig, dtype_name: str, image_token_id: int) -> dict:
    vc = config.vision_config
    text = {k: v for k, v in config.llm_config.items() if k != "rope_scaling"}
    text.update(_rope_for_config(config.llm_config))
    arch = config.source_llm_architecture
    text["model_type"] = LANGUAGE_MODELS[arch].hf_type if arch in LANGUAGE_MODELS else config.model_type
    text["torch_dtype"] = dtype_name
    tie = bool(text.get("tie_word_embeddings", False))
    out = {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": config.downsample_ratio,
        "image_token_id": image_token_id,
        "image_seq_length": config.num_image_token,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": config.select_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": tie,
        "torch_dtype": dtype_name,
        "vision_config": {
            "model_type": "internvl_vision", "hidden_size": vc.hidden_size, "num_hidden_layers": vc.num_hidden_layers,
            "num_attention_heads": vc.num_attention_heads, "intermediate_size": vc.intermediate_size,
            "attention_bias": vc.qkv_bias, "use_qk_norm": vc.qk_normalization, "norm_type": vc.norm_type,
            "layer_norm_eps": vc.layer_norm_eps, "image_size": [vc.image_size, vc.image_size],
            "patch_size": [vc.patch_size, vc.patch_size], "num_channels": vc.num_channels,
            "hidden_act": vc.hidden_act, "use_mean_pooling": True, "use_absolute_position_embeddings": True,
            "layer_scale_init_value": 0.1, "attention_dropout": 0.0, "projection_dropout": 0.0,
            "hidden_dropout_prob": 0.0, "torch_dtype": dtype_name,
        },
        "text_config": text,
        # Not read by transformers; kept so that mlx-internvl picks the same prompt template when loading it back.
        "template": config.template,
    }
    if config.system_message is not None:
        out["system_message"] = config.system_message
    return out


def _image_token_id(config: ModelConfig) -> int:
    if config.image_token_id is None:
        raise UserError("the model config has no image_token_id (its directory has no tokenizer that knows "
                        "<IMG_CONTEXT>), which the -hf layout must record; export it with --layout original")
    return int(config.image_token_id)


def _model_of(model_or_path: Union[nn.Module, str, Path]) -> nn.Module:
    if not isinstance(model_or_path, (str, Path)):
        return model_or_path
    path = Path(model_or_path).expanduser()
    raw, fmt = read_config(path)
    if fmt != "mlx":
        raise UserError(f"{path} is a Hugging Face checkpoint ({fmt} layout), not an MLX directory; "
                        "convert it first, or load it with mlx_internvl.load() and export the model")
    return load_mlx_model(path, raw)


def _export_dtype(weights: Dict[str, mx.array], dtype: Optional[str]) -> mx.Dtype:
    """`dtype`, or else the widest-spread 16-bit float of the weights (bfloat16 before float16), else float32."""
    target = parse_dtype(dtype)
    if target is None:
        floats = {w.dtype for w in weights.values() if mx.issubdtype(w.dtype, mx.floating)}
        target = mx.bfloat16 if mx.bfloat16 in floats else (mx.float16 if mx.float16 in floats else mx.float32)
    return target


def export_hf(
    model_or_path: Union[nn.Module, str, Path],
    out_dir: Union[str, Path],
    layout: str = "original",
    dtype: Optional[str] = None,
    force: bool = False,
    upload_repo: Optional[str] = None,
    card_command: Optional[str] = None,
) -> Path:
    """Write `model_or_path` (an `InternVLChatModel`, or an MLX directory written by `convert`) to `out_dir` as a
    Hugging Face checkpoint in `layout` ('original' or 'hf'), dequantized, in `dtype` (default: the weights' own
    float dtype), with a model card (`card_command`: the command it shows). Tokenizer files come from the model's
    source directory (`config.source_path`, set on load). `upload_repo` then uploads it to the hub."""
    publish.check_repo_id(upload_repo)
    if layout not in LAYOUTS:
        raise UserError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    out = Path(out_dir).expanduser()
    check_new_output(out, force)
    model = _model_of(model_or_path)
    spec = model_or_path if isinstance(model_or_path, (str, Path)) else (model.source_path or "model")
    config: ModelConfig = model.config
    check_exportable(config, layout)
    src = model.source_path
    weights = float_weights(model)
    target = _export_dtype(weights, dtype)
    weights = cast_floats(weights, target)
    has_code = src is not None and any(src.glob("*.py"))
    if layout == "original":
        tensors, cfg = original_tensors(weights, config), original_config(config, DTYPE_NAMES[target], has_code)
    else:
        tensors, cfg = hf_tensors(weights, config), hf_config(config, DTYPE_NAMES[target], _image_token_id(config))
    # Only the lazy graph refers to the parameters now, so each is freed once the tensor it feeds is written
    # (when the caller passed a model object, the caller still holds it).
    del weights, model
    with staged_output(out, force) as tmp:
        save_weights(tensors, tmp, metadata={"format": "pt"}, desc="exporting")
        save_json(tmp / "config.json", cfg)
        names = TOKENIZER_FILES + (LAYOUT_FILES if config.source_format == layout else ())
        copy_model_files(src, tmp, names, remote_code=layout == "original" and has_code)
        model_card.write(tmp, model_card.for_export(spec, src, out, layout=layout, upload_repo=upload_repo,
                                                    command=card_command))
    if upload_repo:
        publish.upload(out, upload_repo)
    return out

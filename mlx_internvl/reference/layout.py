"""Mapping an original-layout (OpenGVLab remote-code) checkpoint onto transformers' InternVL classes, and back.

This is the mapping of transformers' official `convert_internvl_weights_to_hf.py` (InternLM2 becomes Llama by
splitting `wqkv` per KV group; the ViT's fused `qkv` is cut into equal thirds), on torch tensors so the reference
path can run original checkpoints without their remote code. The key names come from the converter's own tables
(`mlx_internvl.convert.keymap`), read in whichever direction is needed. The reverse direction lets tests write
original-layout checkpoints from models built with transformers.
"""

from __future__ import annotations

import copy
import re
from typing import Dict

import torch

from ..config import HF_TEXT_ARCHITECTURES, LANGUAGE_MODELS
from ..convert.keymap import HF_PREFIXES, HF_VISION, INTERNLM2, ORIGINAL, join_wqkv, split_wqkv


def _torch_cat(xs, axis):
    return torch.cat(xs, dim=axis)


def original_llm_config_to_hf(llm: dict) -> dict:
    """`llm_config` of an original checkpoint -> a transformers `text_config` dict."""
    arch = (llm.get("architectures") or [None])[0]
    drop = ("auto_map", "architectures", "_name_or_path", "attn_implementation")
    out = {k: v for k, v in llm.items() if k not in drop}
    if arch == "InternLM2ForCausalLM":
        out["model_type"] = LANGUAGE_MODELS[arch].hf_type
        out["attention_bias"] = bool(llm.get("bias", False))
        out.pop("bias", None)
    return out


def original_config_to_hf(config: dict) -> dict:
    """Original top-level config.json dict -> `InternVLConfig` kwargs."""
    vc = config["vision_config"]
    vision = dict(
        hidden_size=vc["hidden_size"], num_hidden_layers=vc["num_hidden_layers"],
        num_attention_heads=vc["num_attention_heads"], intermediate_size=vc["intermediate_size"],
        image_size=config.get("force_image_size") or vc.get("image_size", 448), patch_size=vc.get("patch_size", 14),
        norm_type=vc.get("norm_type", "rms_norm"), layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
        attention_bias=bool(vc.get("qkv_bias", False)), use_qk_norm=bool(vc.get("qk_normalization", False)),
        hidden_act=vc.get("hidden_act", "gelu"),
    )
    return dict(
        vision_config=vision,
        text_config=original_llm_config_to_hf(config["llm_config"]),
        downsample_ratio=config.get("downsample_ratio", 0.5),
        vision_feature_layer=config.get("select_layer", -1),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def original_to_hf(state: Dict[str, torch.Tensor], llm_config: dict) -> Dict[str, torch.Tensor]:
    """Original-layout tensors -> transformers (legacy prefix) tensors."""
    arch = (llm_config.get("architectures") or [None])[0]
    h = llm_config["num_attention_heads"]
    kv, d = llm_config.get("num_key_value_heads", h), llm_config["hidden_size"] // h
    out = {}
    for key, t in state.items():
        if key.startswith(("vision_model.", "mlp1.")):
            new = HF_VISION.to_theirs(ORIGINAL.to_ours(key))
            m = re.match(r"(.*\.attention)\.qkv\.(weight|bias)$", new)
            if m:
                for name, part in zip("qkv", t.chunk(3, dim=0)):
                    out[f"{m.group(1)}.{name}_proj.{m.group(2)}"] = part.contiguous()
                continue
            out[new] = t
        elif arch == "InternLM2ForCausalLM":
            new = INTERNLM2.to_ours(key)
            m = re.match(r"(.*)\.self_attn\.wqkv\.(weight|bias)$", new)
            if m:
                for name, part in zip("qkv", split_wqkv(t, h, kv, d)):
                    out[f"{m.group(1)}.self_attn.{name}_proj.{m.group(2)}"] = part.contiguous()
                continue
            out[new] = t
        else:
            out[key] = t
    return out


def hf_state_to_original(state: Dict[str, torch.Tensor], llm_config: dict,
                         internlm2: bool = False) -> Dict[str, torch.Tensor]:
    """transformers InternVL tensors (current or legacy prefixes) -> original-layout tensors.

    With `internlm2=True` a Llama text model is written in InternLM2's layout (fused, KV-grouped `wqkv`).
    """
    out, qkv = {}, {}
    for key, t in state.items():
        key = HF_PREFIXES.to_ours(key)
        if key.startswith(("vision_tower.", "multi_modal_projector.")):
            m = re.match(r"(.*\.attention)\.([qkv])_proj\.(weight|bias)$", key)
            if m:
                qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
                continue
            out[ORIGINAL.to_theirs(HF_VISION.to_ours(key))] = t
        else:
            out[key] = t
    for (prefix, kind), parts in qkv.items():
        out[HF_VISION.to_ours(f"{prefix}.qkv.{kind}")] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if internlm2:
        out = _llama_to_internlm2(out, llm_config)
    return out


def _llama_to_internlm2(state: Dict[str, torch.Tensor], llm: dict) -> Dict[str, torch.Tensor]:
    h = llm["num_attention_heads"]
    kv, d = llm.get("num_key_value_heads") or h, llm["hidden_size"] // h
    out, groups = {}, {}
    for key, t in state.items():
        m = re.match(r"(language_model\..*)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            groups.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
        elif key.startswith("language_model."):
            out[INTERNLM2.to_theirs(key)] = t
        else:
            out[key] = t
    for (prefix, kind), p in groups.items():
        wqkv = join_wqkv(p["q"], p["k"], p["v"], h, kv, d, concatenate=_torch_cat)
        out[INTERNLM2.to_theirs(f"{prefix}.self_attn.wqkv.{kind}")] = wqkv
    return out


def hf_config_to_original(hf_config: dict, internlm2: bool = False, ps_version: str = "v2",
                          template: str = "internvl2_5") -> dict:
    """A transformers InternVL config dict -> an original-layout config.json dict."""
    vc, tc = hf_config["vision_config"], copy.deepcopy(hf_config["text_config"])
    size = vc["image_size"][0] if isinstance(vc["image_size"], (list, tuple)) else vc["image_size"]
    patch = vc["patch_size"][0] if isinstance(vc["patch_size"], (list, tuple)) else vc["patch_size"]
    arch = HF_TEXT_ARCHITECTURES[tc["model_type"]]
    if internlm2:
        arch = "InternLM2ForCausalLM"
        tc["model_type"] = LANGUAGE_MODELS[arch].original_type
        tc["bias"] = bool(tc.pop("attention_bias", False))
        for k in ("mlp_bias", "head_dim"):
            tc.pop(k, None)
    tc["architectures"] = [arch]
    rp = tc.pop("rope_parameters", None)
    if rp:
        tc["rope_theta"] = rp.get("rope_theta", 10000.0)
        if rp.get("rope_type", "default") != "default":
            tc["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in rp.items()
                                  if k not in ("rope_theta", "partial_rotary_factor")}
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": hf_config.get("downsample_ratio", 0.5),
        "dynamic_image_size": True,
        "force_image_size": size,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "ps_version": ps_version,
        "select_layer": hf_config.get("vision_feature_layer", -1),
        "template": template,
        "use_thumbnail": True,
        "tie_word_embeddings": False,
        "vision_config": {
            "model_type": "intern_vit_6b", "architectures": ["InternVisionModel"],
            "hidden_size": vc["hidden_size"], "num_hidden_layers": vc["num_hidden_layers"],
            "num_attention_heads": vc["num_attention_heads"], "intermediate_size": vc["intermediate_size"],
            "image_size": size, "patch_size": patch, "norm_type": vc.get("norm_type", "layer_norm"),
            "layer_norm_eps": vc.get("layer_norm_eps", 1e-6), "qkv_bias": bool(vc.get("attention_bias", False)),
            "qk_normalization": bool(vc.get("use_qk_norm", False)), "hidden_act": vc.get("hidden_act", "gelu"),
            "drop_path_rate": 0.0, "use_flash_attn": False,
        },
        "llm_config": tc,
    }

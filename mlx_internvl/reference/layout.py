"""Mapping an original-layout (OpenGVLab remote-code) checkpoint onto transformers' InternVL classes, and back.

This is the mapping of transformers' official `convert_internvl_weights_to_hf.py` (InternLM2 becomes Llama by
splitting `wqkv` per KV group; the ViT's fused `qkv` is cut into equal thirds), written for torch tensors so the
reference path can run original checkpoints without their remote code. The reverse direction lets tests write
original-layout checkpoints from models built with transformers.
"""

from __future__ import annotations

import copy
import re
from typing import Dict

import torch

# original -> transformers (legacy -hf prefixes, which transformers still loads).
VISION_TO_HF = [
    (r"^vision_model\.", "vision_tower."),
    (r"\.layers\.", ".layer."),
    (r"\.class_embedding$", ".cls_token"),
    (r"\.position_embedding$", ".position_embeddings"),
    (r"\.patch_embedding\.", ".patch_embeddings.projection."),
    (r"\.ls(\d)$", r".lambda_\1"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
]
PROJECTOR_TO_HF = [(r"^mlp1\.0\.", "multi_modal_projector.layer_norm."), (r"^mlp1\.1\.", "multi_modal_projector.linear_1."),
                   (r"^mlp1\.3\.", "multi_modal_projector.linear_2.")]
INTERNLM2_TO_LLAMA = [
    (r"\.tok_embeddings\.", ".embed_tokens."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"^language_model\.output\.", "language_model.lm_head."),
]


def _sub(key, table):
    for p, r in table:
        key = re.sub(p, r, key)
    return key


def original_llm_config_to_hf(llm: dict) -> dict:
    """`llm_config` of an original checkpoint -> a transformers `text_config` dict."""
    arch = (llm.get("architectures") or [None])[0]
    out = {k: v for k, v in llm.items() if k not in ("auto_map", "architectures", "_name_or_path", "attn_implementation")}
    if arch == "InternLM2ForCausalLM":
        out["model_type"] = "llama"
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
    out = {}
    for key, t in state.items():
        if key.startswith("vision_model."):
            new = _sub(key, VISION_TO_HF)
            m = re.match(r"(.*\.attention)\.qkv\.(weight|bias)$", new)
            if m:
                for name, part in zip("qkv", t.chunk(3, dim=0)):
                    out[f"{m.group(1)}.{name}_proj.{m.group(2)}"] = part.contiguous()
                continue
            out[new] = t
        elif key.startswith("mlp1."):
            out[_sub(key, PROJECTOR_TO_HF)] = t
        elif arch == "InternLM2ForCausalLM":
            new = _sub(key, INTERNLM2_TO_LLAMA)
            m = re.match(r"(.*)\.attention\.wqkv\.(weight|bias)$", new)
            if m:
                h, kv = llm_config["num_attention_heads"], llm_config.get("num_key_value_heads", llm_config["num_attention_heads"])
                d = llm_config["hidden_size"] // h
                g = h // kv
                grouped = t.reshape(kv, g + 2, d, *t.shape[1:])
                out[f"{m.group(1)}.self_attn.q_proj.{m.group(2)}"] = grouped[:, :g].reshape(h * d, *t.shape[1:]).contiguous()
                out[f"{m.group(1)}.self_attn.k_proj.{m.group(2)}"] = grouped[:, g].reshape(kv * d, *t.shape[1:]).contiguous()
                out[f"{m.group(1)}.self_attn.v_proj.{m.group(2)}"] = grouped[:, g + 1].reshape(kv * d, *t.shape[1:]).contiguous()
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
    legacy = {}
    for key, t in state.items():
        key = re.sub(r"^model\.vision_tower\.", "vision_tower.", key)
        key = re.sub(r"^model\.multi_modal_projector\.", "multi_modal_projector.", key)
        key = re.sub(r"^model\.language_model\.", "language_model.model.", key)
        key = re.sub(r"^lm_head\.", "language_model.lm_head.", key)
        legacy[key] = t
    out, qkv = {}, {}
    for key, t in legacy.items():
        if key.startswith("vision_tower."):
            m = re.match(r"(.*\.attention)\.([qkv])_proj\.(weight|bias)$", key)
            if m:
                qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
                continue
            out[_to_original_vision(key)] = t
        elif key.startswith("multi_modal_projector."):
            out[{"layer_norm": "mlp1.0", "linear_1": "mlp1.1", "linear_2": "mlp1.3"}[key.split(".")[1]] + "." + key.split(".", 2)[2]] = t
        else:
            out[key] = t
    for (prefix, kind), parts in qkv.items():
        out[_to_original_vision(f"{prefix}.qkv.{kind}")] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if internlm2:
        out = _llama_to_internlm2(out, llm_config)
    return out


def _to_original_vision(key: str) -> str:
    key = key.replace("vision_tower.", "vision_model.", 1)
    key = key.replace(".encoder.layer.", ".encoder.layers.")
    key = key.replace(".embeddings.cls_token", ".embeddings.class_embedding")
    key = key.replace(".embeddings.position_embeddings", ".embeddings.position_embedding")
    key = key.replace(".embeddings.patch_embeddings.projection.", ".embeddings.patch_embedding.")
    key = re.sub(r"\.lambda_(\d)$", r".ls\1", key)
    key = key.replace(".attention.projection_layer.", ".attn.proj.")
    key = key.replace(".attention.", ".attn.")
    key = key.replace(".layernorm_before.", ".norm1.").replace(".layernorm_after.", ".norm2.")
    return key


def _llama_to_internlm2(state: Dict[str, torch.Tensor], llm: dict) -> Dict[str, torch.Tensor]:
    h, kv = llm["num_attention_heads"], llm.get("num_key_value_heads") or llm["num_attention_heads"]
    d = llm["hidden_size"] // h
    g = h // kv
    out, groups = {}, {}
    renames = [(".embed_tokens.", ".tok_embeddings."), (".self_attn.o_proj.", ".attention.wo."),
               (".mlp.gate_proj.", ".feed_forward.w1."), (".mlp.up_proj.", ".feed_forward.w3."),
               (".mlp.down_proj.", ".feed_forward.w2."), (".input_layernorm.", ".attention_norm."),
               (".post_attention_layernorm.", ".ffn_norm.")]
    for key, t in state.items():
        if not key.startswith("language_model."):
            out[key] = t
            continue
        m = re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            groups.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
            continue
        if key == "language_model.lm_head.weight":
            out["language_model.output.weight"] = t
            continue
        for a, b in renames:
            key = key.replace(a, b)
        out[key] = t
    for (prefix, kind), p in groups.items():
        rest = p["q"].shape[1:]
        q = p["q"].reshape(kv, g, d, *rest)
        k = p["k"].reshape(kv, 1, d, *rest)
        v = p["v"].reshape(kv, 1, d, *rest)
        out[f"{prefix}.attention.wqkv.{kind}"] = torch.cat([q, k, v], dim=1).reshape((h + 2 * kv) * d, *rest)
    return out


def hf_config_to_original(hf_config: dict, internlm2: bool = False, ps_version: str = "v2",
                          template: str = "internvl2_5") -> dict:
    """A transformers InternVL config dict -> an original-layout config.json dict."""
    vc, tc = hf_config["vision_config"], copy.deepcopy(hf_config["text_config"])
    size = vc["image_size"][0] if isinstance(vc["image_size"], (list, tuple)) else vc["image_size"]
    patch = vc["patch_size"][0] if isinstance(vc["patch_size"], (list, tuple)) else vc["patch_size"]
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
            "llama": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM"}[tc["model_type"]]
    if internlm2:
        arch = "InternLM2ForCausalLM"
        tc["model_type"] = "internlm2"
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

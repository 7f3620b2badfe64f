"""Key maps between the two Hugging Face layouts and ours, and the tensor surgery each needs.

Our MLX layout keeps the original OpenGVLab names for the vision tower (`vision_model.encoder.layers.N.attn.qkv`),
names the projector's submodules (`mlp1.layer_norm/linear_1/linear_2` for `mlp1.0/1/3`), and puts mlx-lm's own
keys under `language_model.`. InternLM2 language models become mlx-lm Llama (`wqkv` split), Qwen3-MoE experts are
stacked into mlx-lm's `switch_mlp`, GPT-OSS's fused experts (`gate_up_proj [E, H, 2I]`, gate and up columns
interleaved; or OpenAI's mxfp4 `_blocks`/`_scales`, dequantized here) become mlx-lm's `experts.{gate,up,down}_proj`.

All renames live in the `Renames` tables below, each written once as (their text, our text) and read in both
directions: conversion reads them one way, export (`export.py`) and the torch reference (`reference/layout.py`)
the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import mlx.core as mx

from mlx_internvl.errors import CheckpointError


class Renames:
    """One rename table between two key layouts, written once and read in both directions.

    Each row is `(theirs, ours)`: literal key text, anchored to the start of the key by a leading `^` or to its
    end by a trailing `$`. `to_ours` replaces each row's left side by its right side, `to_theirs` the reverse;
    both apply the rows in the order written (so a longer match, listed first, wins in either direction).
    """

    def __init__(self, rows: List[Tuple[str, str]]):
        self.rows = rows
        self._to_ours = [self._rule(a, b) for a, b in rows]
        self._to_theirs = [self._rule(b, a) for a, b in rows]

    @staticmethod
    def _rule(src: str, dst: str):
        core = src.strip("^$")
        pattern = ("^" if src.startswith("^") else "") + re.escape(core) + ("$" if src.endswith("$") else "")
        text = dst.strip("^$")
        return re.compile(pattern), lambda m: text

    @staticmethod
    def _apply(key: str, rules) -> str:
        for pattern, repl in rules:
            key = pattern.sub(repl, key)
        return key

    def to_ours(self, key: str) -> str:
        return self._apply(key, self._to_ours)

    def to_theirs(self, key: str) -> str:
        return self._apply(key, self._to_theirs)


# transformers (-hf) key prefixes: the current ones (`model.` first) -> the legacy ones `save_pretrained` writes.
HF_PREFIXES = Renames([
    ("^model.vision_tower.",                      "^vision_tower."),
    ("^model.multi_modal_projector.",             "^multi_modal_projector."),
    ("^model.language_model.",                    "^language_model.model."),
    ("^lm_head.",                                 "^language_model.lm_head."),
])

# transformers (-hf, legacy prefixes) vision tower and projector <-> ours (whose vision keys are the original
# OpenGVLab ones): the mapping of transformers' convert_internvl_weights_to_hf.py, read backwards.
HF_VISION = Renames([
    ("^vision_tower.",                            "^vision_model."),
    (".encoder.layer.",                           ".encoder.layers."),
    (".embeddings.cls_token$",                    ".embeddings.class_embedding$"),
    (".embeddings.position_embeddings$",          ".embeddings.position_embedding$"),
    (".embeddings.patch_embeddings.projection.",  ".embeddings.patch_embedding."),
    (".lambda_1$",                                ".ls1$"),
    (".lambda_2$",                                ".ls2$"),
    (".attention.projection_layer.",              ".attn.proj."),
    (".attention.",                               ".attn."),
    (".layernorm_before.",                        ".norm1."),
    (".layernorm_after.",                         ".norm2."),
    ("^multi_modal_projector.",                   "^mlp1."),
])

# original OpenGVLab projector (an nn.Sequential) <-> ours (named submodules).
ORIGINAL = Renames([
    ("^mlp1.0.",                                  "^mlp1.layer_norm."),
    ("^mlp1.1.",                                  "^mlp1.linear_1."),
    ("^mlp1.3.",                                  "^mlp1.linear_2."),
    # InternVL3.5-Flash: mlp2 (dropouts at 3, 6) and the router's gating blocks (dropouts at 2, 4).
    ("^mlp2.0.",                                  "^mlp2.layer_norm."),
    ("^mlp2.1.",                                  "^mlp2.linear_1."),
    ("^mlp2.4.",                                  "^mlp2.linear_2."),
    ("^mlp2.7.",                                  "^mlp2.linear_3."),
    *[(f"^gating.block{i}.{a}.", f"^gating.block{i}.{b}.") for i in range(1, 5)
      for a, b in (("0", "fc1"), ("3", "fc2"), ("5", "norm"))],
    ("^gating.gate.0.",                           "^gating.gate_norm."),
    ("^gating.gate.1.",                           "^gating.gate_proj."),
])

# InternLM2 (original layout, under `language_model.`) <-> mlx-lm / transformers Llama. The fused `wqkv` keeps
# its name here; `split_wqkv` / `join_wqkv` cut it into q/k/v and back.
INTERNLM2 = Renames([
    (".model.tok_embeddings.",                    ".model.embed_tokens."),
    (".attention.wo.",                            ".self_attn.o_proj."),
    (".attention.wqkv.",                          ".self_attn.wqkv."),
    (".feed_forward.w1.",                         ".mlp.gate_proj."),
    (".feed_forward.w3.",                         ".mlp.up_proj."),
    (".feed_forward.w2.",                         ".mlp.down_proj."),
    (".attention_norm.",                          ".input_layernorm."),
    (".ffn_norm.",                                ".post_attention_layernorm."),
    ("^language_model.output.",                   "^language_model.lm_head."),
])

# Buffers and leftovers that carry no weights we use.
DROP = [r"\.rotary_emb\.inv_freq$", r"\.rope\.inv_freq$", r"\.attention\.rotary_emb\.", r"\.drop_path"]


# ---- tensor surgery: one small function per layout change ----

def conv_oihw_to_ohwi(w: mx.array) -> mx.array:
    """torch Conv2d weight `[O, I, kh, kw]` -> MLX `[O, kh, kw, I]`."""
    return w.transpose(0, 2, 3, 1)


def conv_ohwi_to_oihw(w: mx.array) -> mx.array:
    """MLX Conv2d weight `[O, kh, kw, I]` -> torch `[O, I, kh, kw]`."""
    return w.transpose(0, 3, 1, 2)


def fuse_qkv(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """Separate q/k/v rows (`[C, C]` each, or biases `[C]`) -> fused `[3C, ...]` in q|k|v order."""
    return mx.concatenate([q, k, v], axis=0)


def split_wqkv(w: mx.array, n_heads: int, n_kv_heads: int, head_dim: int):
    """InternLM2 `wqkv` `[(H + 2 Hkv) d, ...]`, grouped per KV head as `[q_0..q_{g-1}, k, v]`, -> (q, k, v).

    Query head `kv * g + j` is row block j of group kv, which is the order Llama's repeat-kv expects.
    """
    g = n_heads // n_kv_heads
    rest = w.shape[1:]
    w = w.reshape(n_kv_heads, g + 2, head_dim, *rest)
    q = w[:, :g].reshape(n_heads * head_dim, *rest)
    k = w[:, g].reshape(n_kv_heads * head_dim, *rest)
    v = w[:, g + 1].reshape(n_kv_heads * head_dim, *rest)
    return q, k, v


def join_wqkv(q, k, v, n_heads: int, n_kv_heads: int, head_dim: int, concatenate=mx.concatenate):
    """Inverse of `split_wqkv`: Llama q/k/v -> InternLM2 grouped `wqkv`. Like `split_wqkv` it works on MLX arrays
    and (with `concatenate=lambda xs, axis: torch.cat(xs, dim=axis)`) on torch tensors."""
    g = n_heads // n_kv_heads
    rest = q.shape[1:]
    q = q.reshape(n_kv_heads, g, head_dim, *rest)
    k = k.reshape(n_kv_heads, 1, head_dim, *rest)
    v = v.reshape(n_kv_heads, 1, head_dim, *rest)
    return concatenate([q, k, v], axis=1).reshape((n_heads + 2 * n_kv_heads) * head_dim, *rest)


def split_gate_up(w: mx.array):
    """Fused experts `[E, 2I, H]` (gate rows, then up rows) -> stacked gate `[E, I, H]` and up `[E, I, H]`."""
    half = w.shape[1] // 2
    return w[:, :half], w[:, half:]


def deinterleave_gate_up(w: mx.array):
    """GPT-OSS fused experts `[E, H, 2I]` (gate and up columns alternate) -> gate `[E, I, H]`, up `[E, I, H]`;
    the bias `[E, 2I]` -> gate `[E, I]`, up `[E, I]`."""
    if w.ndim == 2:
        return w[:, ::2], w[:, 1::2]
    return w[..., ::2].swapaxes(1, 2), w[..., 1::2].swapaxes(1, 2)


def interleave_gate_up(gate, up, stack=mx.stack):
    """Inverse of `deinterleave_gate_up` (weights `[E, I, H]` or biases `[E, I]`). Works on torch tensors too
    (`stack=lambda xs, axis: torch.stack(xs, dim=axis)`)."""
    if gate.ndim == 3:
        gate, up = gate.swapaxes(1, 2), up.swapaxes(1, 2)
    return stack([gate, up], axis=gate.ndim).reshape(*gate.shape[:-1], 2 * gate.shape[-1])


def join_gpt_oss_experts(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Inverse of the GPT-OSS expert mapping: mlx-lm's `experts.{gate,up,down}_proj.{weight,bias}` -> the fused
    `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]` and their `_bias` tensors. Other keys pass through."""
    out, parts = {}, {}
    for key, w in weights.items():
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.(weight|bias)$", key)
        if not m:
            out[key] = w
        elif m.group(2) == "down_proj":
            out[f"{m.group(1)}.down_proj" + ("_bias" if m.group(3) == "bias" else "")] = (
                w if m.group(3) == "bias" else w.swapaxes(1, 2))
        else:
            parts.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = w
    for (prefix, part), p in parts.items():
        out[f"{prefix}.gate_up_proj" + ("_bias" if part == "bias" else "")] = interleave_gate_up(p["gate_proj"],
                                                                                               p["up_proj"])
    return out


def dequantize_mxfp4(blocks: mx.array, scales: mx.array) -> mx.array:
    """OpenAI's mxfp4 experts, `blocks [E, out, in/32, 16]` (uint8, two 4-bit values a byte) and `scales
    [E, out, in/32]` (uint8 exponents), -> `[E, out, in]` floats: MLX's own mxfp4 layout once the bytes of a row
    are read as uint32 words."""
    words = blocks.view(mx.uint32).flatten(-2)
    return mx.dequantize(words, scales, group_size=32, bits=4, mode="mxfp4")


@dataclass
class Entry:
    """One output tensor: computed by `fn` from the source tensors named in `sources`."""

    sources: List[str]
    fn: Callable[..., mx.array]


def _identity(x):
    return x


def our_name(src: str, fmt: str, source_arch: str) -> str:
    """A source key of layout `fmt` ('original' or 'hf') under our name (before any tensor surgery)."""
    if fmt == "hf":
        key = HF_PREFIXES.to_ours(src)
        return key if key.startswith("language_model.") else HF_VISION.to_ours(key)
    key = ORIGINAL.to_ours(src)
    return INTERNLM2.to_ours(key) if source_arch == "InternLM2ForCausalLM" else key


_GPT_OSS_EXPERTS = re.compile(r"^(language_model\.model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)"
                              r"(_bias|_blocks|_scales)?$")


def _place_gpt_oss_experts(key: str, src: str, plan: Dict[str, Entry]) -> bool:
    """GPT-OSS's fused expert tensors -> mlx-lm's `experts.{gate,up,down}_proj.{weight,bias}`; False for others."""
    m = _GPT_OSS_EXPERTS.match(key)
    if not m:
        return False
    prefix, name, kind = m.group(1), m.group(2), m.group(3) or ""
    if kind == "_scales":
        return True  # read with its `_blocks`
    part = "bias" if kind == "_bias" else "weight"
    sources = [src, src[: -len("_blocks")] + "_scales"] if kind == "_blocks" else [src]
    # every source as transformers holds it: weights [E, in, out], biases [E, out]
    held = (lambda b, s: dequantize_mxfp4(b, s).swapaxes(1, 2)) if kind == "_blocks" else _identity
    if name == "down_proj":
        plan[f"{prefix}.down_proj.{part}"] = Entry(sources, held if part == "bias" else
                                                   lambda *xs: held(*xs).swapaxes(1, 2))
        return True
    for i, proj in enumerate(("gate_proj", "up_proj")):
        plan[f"{prefix}.{proj}.{part}"] = Entry(sources, lambda *xs, i=i: deinterleave_gate_up(held(*xs))[i])
    return True


def _place(key: str, src: str, plan: Dict[str, Entry], groups: Dict[str, dict], llm_config: dict) -> None:
    """Add the output tensor(s) that source `src` (named `key` in our layout) feeds: to `plan` directly, or to
    `groups` when several sources make one tensor (ViT q/k/v, per-expert weights)."""
    if llm_config.get("model_type") == "gpt_oss" and _place_gpt_oss_experts(key, src, plan):
        return
    m = re.match(r"^(vision_model\.encoder\.layers\.\d+\.attn)\.([qkv])_proj\.(weight|bias)$", key)
    if m:
        groups.setdefault(f"{m.group(1)}.qkv.{m.group(3)}", {})[m.group(2)] = src
        return
    m = re.match(r"^(language_model\.model\.layers\.\d+\.self_attn)\.wqkv\.(weight|bias)$", key)
    if m:
        h, kv = llm_config["num_attention_heads"], llm_config["num_key_value_heads"]
        d = llm_config["hidden_size"] // h
        for i, name in enumerate("qkv"):
            plan[f"{m.group(1)}.{name}_proj.{m.group(2)}"] = Entry([src], lambda w, i=i: split_wqkv(w, h, kv, d)[i])
        return
    m = re.match(r"^(language_model\.model\.layers\.\d+\.mlp)\.experts\.(gate_up_proj|down_proj)$", key)
    if m and m.group(2) == "gate_up_proj":
        # transformers >= 5 in memory: [E, 2I, H] with gate rows first.
        plan[f"{m.group(1)}.switch_mlp.gate_proj.weight"] = Entry([src], lambda w: split_gate_up(w)[0])
        plan[f"{m.group(1)}.switch_mlp.up_proj.weight"] = Entry([src], lambda w: split_gate_up(w)[1])
    elif m:
        plan[f"{m.group(1)}.switch_mlp.down_proj.weight"] = Entry([src], _identity)  # already [E, H, I]
    elif m := re.match(r"^(language_model\.model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(\w+)\.weight$", key):
        groups.setdefault(f"{m.group(1)}.switch_mlp.{m.group(3)}.weight", {})[int(m.group(2))] = src
    elif key == "vision_model.embeddings.patch_embedding.weight":
        plan[key] = Entry([src], conv_oihw_to_ohwi)
    else:
        plan[key] = Entry([src], _identity)


def _grouped(key: str, parts: dict, llm_config: dict) -> Entry:
    """The entry of a tensor made of several sources: fused ViT q|k|v, or experts stacked as `[E, ...]`."""
    if key.endswith((".qkv.weight", ".qkv.bias")):
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            present = next(iter(parts.values()))
            lacking = ", ".join(m + "_proj" for m in missing)
            raise CheckpointError(f"{present}: the checkpoint lacks the matching {lacking}")
        return Entry([parts["q"], parts["k"], parts["v"]], fuse_qkv)
    n = llm_config.get("num_experts")
    if n is not None and sorted(parts) != list(range(n)):
        raise CheckpointError(f"{key}: expected experts 0..{n - 1}, found {sorted(parts)}")
    return Entry([parts[e] for e in sorted(parts)], lambda *xs: mx.stack(xs))


def build_plan(keys: List[str], fmt: str, llm_config: dict, source_arch: str) -> Dict[str, Entry]:
    """Map every source key of a checkpoint in layout `fmt` ('original' or 'hf') to our keys.

    Returns `{our_key: Entry}`. Keys that cannot be placed end up under their renamed name, so the strict load
    that follows lists them as unexpected.
    """
    plan: Dict[str, Entry] = {}
    groups: Dict[str, Dict[str, str]] = {}
    for src in keys:
        if not any(re.search(p, src) for p in DROP):
            _place(our_name(src, fmt, source_arch), src, plan, groups, llm_config)
    plan.update({key: _grouped(key, parts, llm_config) for key, parts in groups.items()})
    return plan

"""Tiny, seeded InternVL checkpoints built with transformers' own classes, written in both Hugging Face layouts.

The model is always built and initialised by transformers (`InternVLForConditionalGeneration` with the requested
text backbone); every parameter is then overwritten with seeded noise of a size that keeps logits well separated
(so greedy tokens are not decided by rounding). The `-hf` directory is transformers' own `save_pretrained`
output; the original-layout directory is the same tensors written under the OpenGVLab names.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

FIXTURES = Path(__file__).parent / "fixtures"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>",
            "<ref>", "</ref>", "<box>", "</box>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<s>", "</s>"]
# The rest of OpenAI's harmony markers (GPT-OSS's o200k tokenizer has each as one special token; `<|end|>` is above).
HARMONY = ["<|start|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>"]


def tiny_tokenizer(out: Path, bos: bool = False, think: bool = False, harmony: bool = False) -> int:
    """A byte-level BPE tokenizer with 256 byte tokens, a few merges and InternVL's special tokens.

    With `bos=True` it prepends `<s>` like InternLM2/Phi-3/Llama tokenizers; with `think=True` it has Qwen3's
    `<think>`/`</think>`, added as Qwen3 adds them (one token each, not special: decoding keeps them); with
    `harmony=True` it has GPT-OSS's harmony markers as special tokens. Returns its length.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": SPECIALS + (HARMONY if harmony else [])})
    if think:
        fast.add_tokens(["<think>", "</think>"])
    if bos:
        bos_id = fast.convert_tokens_to_ids("<s>")
        fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
        fast.bos_token = "<s>"
        fast.eos_token = "</s>"
    else:
        fast.eos_token = "<|im_end|>"
    fast.pad_token = "<|endoftext|>"
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return len(fast)


@dataclass
class Case:
    """One tiny configuration; the field names say which config branch it exercises."""

    name: str
    text: str = "qwen2"  # qwen2 | qwen3 | qwen3_moe | llama | internlm2 | phi3 | gpt_oss
    vision: str = "300m"  # 300m (LayerNorm, qkv bias) | 6b (RMSNorm, qk-norm, no bias)
    select_layer: int = -1
    ps_version: str = "v2"
    tie: bool = False
    kv_heads: int = 2
    rope_scaling: Optional[dict] = None
    image_size: int = 56
    template: str = "internvl2_5"
    seed: int = 0
    extra_text: dict = field(default_factory=dict)
    think_tokens: bool = False  # the tokenizer has Qwen3's <think> and </think>
    tokenizer: Optional[str] = None  # a folder of fixtures/tokenizers to use instead of the tiny BPE one

    @property
    def bos(self) -> bool:
        return self.text in ("internlm2", "phi3", "llama")


def text_config(case: Case, vocab: int) -> dict:
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=case.kv_heads,
                intermediate_size=96, vocab_size=vocab, max_position_embeddings=512, rms_norm_eps=1e-6,
                tie_word_embeddings=case.tie, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    mt = {"internlm2": "llama"}.get(case.text, case.text)
    base["model_type"] = mt
    if mt == "qwen3":
        base["head_dim"] = 24  # not hidden/heads, as in real Qwen3
    if mt == "qwen3_moe":
        base.update(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                    decoder_sparse_step=1, mlp_only_layers=[])
    if mt == "gpt_oss":
        # Alternating sliding (window 8, shorter than every prompt) and full layers; GPT-OSS's own YaRN settings.
        base.update(head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-5,
                    rope_scaling=dict(GPT_OSS_YARN), max_position_embeddings=131072)
    if mt == "llama":
        base["rms_norm_eps"] = 1e-5
    if mt == "phi3":
        base.update(rms_norm_eps=1e-5, original_max_position_embeddings=64, max_position_embeddings=256)
    base["rope_theta"] = 1e6 if mt.startswith("qwen") else (150000.0 if mt == "gpt_oss" else 10000.0)
    if case.rope_scaling:
        base["rope_scaling"] = dict(case.rope_scaling)
    base.update(case.extra_text)
    return base

# The rope kinds each backbone's configs can carry (InternVL3's Qwen2.5 and InternVL2/2.5's InternLM2: dynamic NTK;
# InternVL2-4B's Phi-3-mini-128k: longrope), plus each kind mlx-lm's rope builder offers for Qwen2.
ROPE_KINDS = {
    "qwen2": ("default", "linear", "dynamic", "llama3", "yarn", "longrope"),
    "qwen3": ("default", "dynamic", "yarn"),
    "qwen3_moe": ("default", "yarn"),
    "llama": ("default", "linear", "dynamic", "llama3"),
    "internlm2": ("default", "linear", "dynamic"),
    "phi3": ("default", "longrope"),
}
TEMPLATES = {"internlm2": "internlm2-chat", "phi3": "phi3-chat", "llama": "Hermes-2", "gpt_oss": "internvl3_5_gpt_oss"}
# gpt-oss-20b's rope: YaRN x32 over 4096 positions with an unrounded correction range (`truncate: false`; for the
# tiny 16-wide heads the range is 2.02..4.35, which rounding would make 2..5).
GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}


def rope_scaling(kind: str, head_dim: int, limit: int):
    """(rope_scaling, extra text-config keys) of one rope kind whose limit (`max_position_embeddings` for dynamic
    NTK, the original length for the others) is `limit`."""
    if kind == "default":
        return None, {}
    if kind == "linear":
        return {"rope_type": "linear", "factor": 2.0}, {}
    if kind == "dynamic":
        return {"rope_type": "dynamic", "factor": 2.0}, {"max_position_embeddings": limit}
    longer = {"max_position_embeddings": 4 * limit}
    if kind == "llama3":
        return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": limit}, longer
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": limit}, longer
    if kind == "longrope":
        n = head_dim // 2
        short = [1.0 + 0.05 * i for i in range(n)]
        long = [1.0 + 1.5 * i for i in range(n)]  # far from `short`, so a wrong choice changes every logit
        return {"rope_type": "longrope", "short_factor": short, "long_factor": long,
                "original_max_position_embeddings": limit}, dict(longer, original_max_position_embeddings=limit)
    raise ValueError(f"unknown rope kind {kind!r}")


def rope_case(name: str, text: str, kind: str, limit: int, seed: int = 3) -> Case:
    """A checkpoint of backbone `text` with rope `kind` whose limit is `limit` tokens."""
    head_dim = {"qwen3": 24, "qwen3_moe": 16}.get(text, 16)  # text_config's head sizes
    scaling, extra = rope_scaling(kind, head_dim, limit)
    return Case(name, text=text, template=TEMPLATES.get(text, "internvl2_5"), rope_scaling=scaling, extra_text=extra,
                kv_heads=4 if text == "phi3" else 2, seed=seed)


def vision_config(case: Case) -> dict:
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                  image_size=case.image_size, patch_size=14, layer_norm_eps=1e-6)
    if case.vision == "6b":
        return dict(common, norm_type="rms_norm", attention_bias=False, use_qk_norm=True)
    return dict(common, norm_type="layer_norm", attention_bias=True, use_qk_norm=False)


def randomize(model, seed: int) -> None:
    """Seeded noise in every parameter; matrices scaled by their fan-in (GPT-OSS's fused experts `[E, in, out]`
    by `in`)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    gpt_oss = model.config.text_config.model_type == "gpt_oss"
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight") or "layernorm" in name or "layer_norm.weight" in name or name.endswith(
                    ("q_norm.weight", "k_norm.weight", "norm1.weight", "norm2.weight")):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "lambda_" in name:
                p.copy_(0.5 + 0.2 * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.5 * noise)
            else:
                gpt_oss_experts = gpt_oss and name.endswith(("experts.gate_up_proj", "experts.down_proj"))
                fan_in = p.shape[1] if gpt_oss_experts else (p[0].numel() if p.ndim > 1 else 1)
                p.copy_(noise * (1.5 / fan_in**0.5) if p.ndim > 1 else 0.5 * noise)


@dataclass
class Built:
    case: Case
    model: object  # transformers InternVLForConditionalGeneration (fp32, eval)
    hf_dir: Path
    original_dir: Path
    image_token_id: int


def build(case: Case, root: Path) -> Built:
    """Build the case's transformers model and write it as `-hf` (transformers' save) and original layout."""
    import torch
    from safetensors.torch import save_file
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from mlx_internvl.reference.layout import hf_config_to_original, hf_state_to_original

    tok_dir = root / "tokenizer"
    if case.tokenizer:
        from mlx_internvl.tokenizer import load_hf_tokenizer

        tok_dir.mkdir(parents=True, exist_ok=True)
        _copy_tokenizer(FIXTURES / "tokenizers" / case.tokenizer, tok_dir)
        real = load_hf_tokenizer(tok_dir)
        vocab, image_token_id = len(real), real.convert_tokens_to_ids("<IMG_CONTEXT>")
    else:
        vocab = tiny_tokenizer(tok_dir, bos=case.bos, think=case.think_tokens, harmony=case.text == "gpt_oss")
        from transformers import AutoTokenizer

        image_token_id = AutoTokenizer.from_pretrained(str(tok_dir)).convert_tokens_to_ids("<IMG_CONTEXT>")
    torch.manual_seed(case.seed)
    cfg = InternVLConfig(vision_config=vision_config(case), text_config=text_config(case, vocab + 3),
                         image_token_id=image_token_id, vision_feature_layer=case.select_layer,
                         tie_word_embeddings=case.tie)
    model = InternVLForConditionalGeneration(cfg).eval()
    randomize(model, case.seed)
    if case.tie:
        model.tie_weights()

    hf_dir = root / "hf"
    model.save_pretrained(str(hf_dir))
    _copy_tokenizer(tok_dir, hf_dir)

    orig_dir = root / "original"
    orig_dir.mkdir(parents=True, exist_ok=True)
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    internlm2 = case.text == "internlm2"
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if case.tie:
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    orig_state = hf_state_to_original(state, hf_cfg["text_config"], internlm2)
    if case.text != "gpt_oss":  # GPT-OSS checkpoints store their experts fused, as transformers holds them
        orig_state = _split_fused_experts(orig_state)
    save_file({k: v.contiguous() for k, v in orig_state.items()}, str(orig_dir / "model.safetensors"),
              metadata={"format": "pt"})
    orig_cfg = hf_config_to_original(hf_cfg, internlm2=internlm2, ps_version=case.ps_version, template=case.template)
    orig_cfg["tie_word_embeddings"] = case.tie
    orig_cfg["llm_config"]["tie_word_embeddings"] = case.tie
    (orig_dir / "config.json").write_text(json.dumps(orig_cfg, indent=2))
    _copy_tokenizer(tok_dir, orig_dir)
    return Built(case, model, hf_dir, orig_dir, image_token_id)


def _split_fused_experts(state: dict) -> dict:
    """transformers 5 keeps MoE experts fused in memory (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj
    [E, H, I]`); released checkpoints store them per expert (`experts.E.gate_proj.weight`, ...)."""
    out = {}
    for k, v in state.items():
        if k.endswith(".mlp.experts.gate_up_proj"):
            prefix = k[: -len("gate_up_proj")]
            gate, up = v.chunk(2, dim=1)
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = gate[e]
                out[f"{prefix}{e}.up_proj.weight"] = up[e]
        elif k.endswith(".mlp.experts.down_proj"):
            prefix = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, dst / f.name)

"""Speculative decoding: a small draft proposes tokens, the target checks several of them in one forward pass.

The decoding loop is mlx-lm's `speculative_generate_step`: the draft proposes `num_draft_tokens` tokens, the target
runs them in one pass and samples its own token at every position; a draft token is kept while it equals the
target's sample, and the first differing position emits the target's token. Every emitted token is therefore the
target's own sample given the tokens before it, so greedy output is the target's greedy output and sampled output
follows the target's distribution; the draft only decides how many tokens one target pass yields.

`speculative_generate_step` runs text only. An InternVL prompt carries image embeddings, so both KV caches are
filled here first, from merged embeddings (each model with its own image features), with every prompt token but
the last; the last token is then handed to mlx-lm as the prompt, and everything after it is text.

Two kinds of draft:
- another InternVL checkpoint that shares the target's tokenizer (e.g. InternVL3-1B for InternVL3-8B); it encodes
  the images with its own ViT;
- a self-draft: the target's own language model quantized in memory to 4 or 8 bits (adapters fused first), sharing
  the target's ViT and projector, so the image features are computed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.generate import speculative_generate_step
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from .adapters import adapter_modules
from .backbones import build_language_model
from .errors import UserError
from .loading import load
from .model import InternVLChatModel
from .weights import quantize

DEFAULT_NUM_DRAFT_TOKENS = 3


@dataclass
class DraftStats:
    """Counters of the last generation: draft tokens proposed and accepted, target forward passes after the
    prompt, tokens generated. `passes_per_token` is what a draft saves: 1.0 without one."""

    proposed: int = 0
    accepted: int = 0
    target_passes: int = 0
    generated: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def passes_per_token(self) -> float:
        return self.target_passes / self.generated if self.generated else 0.0

    def add(self, other: DraftStats) -> None:
        for k in ("proposed", "accepted", "target_passes", "generated"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def summary(self) -> str:
        return (f"Draft: {self.accepted}/{self.proposed} proposed tokens accepted ({self.acceptance_rate:.0%}), "
                f"{self.passes_per_token:.2f} target passes per token")


class _SelfDraftModel(InternVLChatModel):
    """The target's ViT and projector (the same modules, not copies) in front of a quantized copy of its LLM."""

    def __init__(self, target: InternVLChatModel, language_model: nn.Module):
        nn.Module.__init__(self)
        self.config = target.config
        self.vision_model = target.vision_model
        self.mlp1 = target.mlp1
        self.language_model = language_model


class Draft:
    """A draft model for `stream_generate(..., draft=...)`, `ChatSession(draft=...)` and the CLI's `--draft-model` /
    `--draft-quantize`. Build it with `Draft.from_model` (another loaded InternVL) or `Draft.self_draft`.
    `stats` holds the counters of the last generation, `total` those of all generations so far."""

    def __init__(self, model: InternVLChatModel, num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
                 kind: str = "model"):
        if not 1 <= num_draft_tokens <= 64:
            raise UserError(f"num_draft_tokens must be between 1 and 64, got {num_draft_tokens}")
        self.model = model
        self.num_draft_tokens = num_draft_tokens
        self.kind = kind
        self.stats = DraftStats()
        self.total = DraftStats()

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_model(cls, target: InternVLChatModel, target_processor, draft: InternVLChatModel, draft_processor,
                   num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS, name: str = "the draft model") -> Draft:
        """Another InternVL as the draft; its tokenizer must be the target's (same tokens, same ids)."""
        check_same_vocabulary(target, target_processor, draft, draft_processor, name)
        return cls(draft, num_draft_tokens, kind="model")

    @classmethod
    def self_draft(cls, target: InternVLChatModel, bits: int = 4, group_size: int = 64,
                   num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS) -> Draft:
        """The target's language model quantized to `bits` in memory (LoRA/DoRA adapters fused first, a quantized
        target dequantized first), behind the target's own ViT and projector."""
        if bits not in (4, 8):
            raise UserError(f"--draft-quantize must be 4 or 8, got {bits}")
        q = target.config.quantization
        if q and q.get("bits", 16) <= bits:
            raise UserError(f"the target is already quantized to {q['bits']} bits, so a {bits}-bit self-draft would "
                            f"read as many bytes per token; use --draft-quantize with fewer bits than the target's, "
                            f"or a smaller --draft-model")
        lm = build_language_model(target.config.llm_config)
        lm.load_weights(list(float_weights(target.language_model).items()), strict=True)
        draft = _SelfDraftModel(target, lm)
        quantize(draft, bits, group_size)
        draft.eval()
        mx.eval(lm.parameters())
        return cls(draft, num_draft_tokens, kind=f"self-{bits}bit")

    # -- what generation needs ----------------------------------------------------------------------------------

    @property
    def shares_vision(self) -> bool:
        return isinstance(self.model, _SelfDraftModel)

    def features(self, pixel_values: Optional[mx.array], target_features: Optional[mx.array]) -> Optional[mx.array]:
        """The draft's image features for `pixel_values` (the target's own when the ViT is shared)."""
        if pixel_values is None or self.shares_vision:
            return target_features
        return self.model.extract_feature(pixel_values)

    def make_cache(self, target: InternVLChatModel) -> list:
        """One list for both models, target layers first: the layout `speculative_generate_step` takes."""
        return target.make_cache() + self.model.make_cache()

    def split(self, target: InternVLChatModel, cache: list):
        n = len(target.layers)
        if len(cache) != n + len(self.model.layers):
            raise ValueError("the prompt cache does not hold both the target's and the draft's layers")
        return cache[:n], cache[n:]

    def align(self, target: InternVLChatModel, cache: list) -> int:
        """Trim both caches to the tokens both hold (after a fully accepted draft the draft is one token behind)
        and return that count."""
        parts = self.split(target, cache)
        n = min(p[0].offset for p in parts)
        for p in parts:
            trim_prompt_cache(p, p[0].offset - n)
        return n

    def prefill_draft(self, input_ids: List[int], features: Optional[mx.array], cache: list, step: int = 2048):
        """Run `input_ids` (with the draft's image features) into the draft's part of a combined cache."""
        for _ in self.model.prefill(input_ids, features, cache, step) if input_ids else ():
            pass

    def generate_step(self, model: InternVLChatModel, input_ids: List[int], image_features: Optional[mx.array],
                      draft_features: Optional[mx.array], prompt_cache: Optional[list] = None, *, max_tokens: int,
                      sampler=None, logits_processors=None, prefill_step_size: int = 2048) -> Iterator[tuple]:
        """Like mlx-lm's `generate_step` for an image prompt: yields (token, logprobs, from_draft).

        `prompt_cache` is a combined cache (`make_cache`), possibly holding a prefix of the conversation already
        (both parts at the same length); `input_ids` is the part after it."""
        if prompt_cache is None:
            prompt_cache = self.make_cache(model)
        target_cache, draft_cache = self.split(model, prompt_cache)
        if not can_trim_prompt_cache(prompt_cache):
            raise UserError("speculative decoding needs a KV cache that can be trimmed; drop --max-kv-size")
        if not input_ids:
            raise UserError("speculative decoding needs at least one new prompt token")
        if input_ids[-1] == model.image_token_id:
            raise UserError("the prompt ends with an image token; speculative decoding needs a text token last")
        head = input_ids[:-1]
        if head:
            for _ in model.prefill(head, image_features, target_cache, prefill_step_size):
                pass
            self.prefill_draft(head, draft_features, draft_cache, prefill_step_size)
        self.stats = stats = DraftStats()
        steps = speculative_generate_step(mx.array(input_ids[-1:], dtype=mx.uint32), model, self.model,
                                          num_draft_tokens=self.num_draft_tokens, max_tokens=max_tokens,
                                          sampler=sampler, logits_processors=logits_processors,
                                          prompt_cache=prompt_cache, prefill_step_size=prefill_step_size)
        new_round = True
        try:
            for token, logprobs, from_draft in steps:
                if new_round:  # one target pass checks min(k, tokens left) draft tokens
                    stats.target_passes += 1
                    stats.proposed += min(self.num_draft_tokens, max_tokens - stats.generated)
                stats.generated += 1
                stats.accepted += bool(from_draft)
                new_round = not from_draft
                yield token, logprobs, from_draft
        finally:
            steps.close()
            self.total.add(stats)


def check_same_vocabulary(target, target_processor, draft, draft_processor, name: str = "the draft model") -> None:
    """A draft's token ids must mean the target's tokens: same tokenizer vocabulary, same embedding rows, same
    image token."""
    tv, dv = target.config.llm_config["vocab_size"], draft.config.llm_config["vocab_size"]
    t_vocab, d_vocab = target_processor.tokenizer.get_vocab(), draft_processor.tokenizer.get_vocab()
    if t_vocab != d_vocab:
        diff = sorted(set(t_vocab.items()) ^ set(d_vocab.items()), key=lambda kv: kv[1])[:3]
        raise UserError(f"{name} has a different tokenizer vocabulary ({len(d_vocab)} tokens, the target's has "
                        f"{len(t_vocab)}; first differences: {diff}); a draft must share the target's tokenizer, "
                        "e.g. InternVL3-1B for InternVL3-8B/14B/38B/78B")
    if tv != dv:
        raise UserError(f"{name} has {dv} rows in its embedding table (vocab_size), the target {tv}; a draft must "
                        "have the same vocabulary as the target")
    if target.image_token_id != draft.image_token_id:
        raise UserError(f"{name} uses image token id {draft.image_token_id}, the target {target.image_token_id}")


def float_weights(lm: nn.Module) -> dict:
    """The language model's weights as full-precision tensors: adapter layers fused, quantized layers dequantized."""
    out, done = {}, []
    for name, module in adapter_modules(lm):
        fused = module.fuse(dequantize=True)
        out.update({f"{name}.{k}": v for k, v in tree_flatten(fused.parameters())})
        done.append(name + ".")
    for name, module in lm.named_modules():
        if name.startswith(tuple(done)):
            continue
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)):
            out[f"{name}.weight"] = mx.dequantize(module.weight, module.scales, module.get("biases"),
                                                  module.group_size, module.bits, getattr(module, "mode", "affine"))
            if "bias" in module:
                out[f"{name}.bias"] = module.bias
            done.append(name + ".")
    for k, v in tree_flatten(lm.parameters()):
        if not k.startswith(tuple(done)):
            out[k] = v
    return out


def load_draft(target, target_processor, draft_model=None, draft_quantize: Optional[int] = None,
               num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS, dtype=None, revision: Optional[str] = None):
    """The CLI's draft: `draft_model` (a directory or hub id, loaded like `--model`) or `draft_quantize` bits."""
    if draft_model is not None and draft_quantize is not None:
        raise UserError("give either --draft-model or --draft-quantize, not both")
    if draft_quantize is not None:
        return Draft.self_draft(target, int(draft_quantize), num_draft_tokens=num_draft_tokens)
    if draft_model is None:
        return None
    d_model, d_proc = load(draft_model, dtype=dtype, revision=revision)
    return Draft.from_model(target, target_processor, d_model, d_proc, num_draft_tokens, name=f"draft {draft_model}")

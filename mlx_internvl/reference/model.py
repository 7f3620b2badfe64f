"""The torch reference: transformers' own InternVL classes on any torch device, with every stage captured.

- `-hf` checkpoints load with `InternVLForConditionalGeneration.from_pretrained` as they are.
- Original-layout checkpoints are mapped in memory (`layout.original_to_hf`, the official converter's mapping;
  InternLM2 becomes Llama) and handed to `from_pretrained(None, config=..., state_dict=...)`, so transformers' own
  key handling (legacy prefixes, fused MoE experts, tied heads) applies. No checkpoint remote code is run here; a
  Flash checkpoint loads without its router tensors, whose reference is the checkpoint's own code (`flash.py`).
- transformers only implements pixel shuffle `v2`; for `ps_version: v1` checkpoints the reference swaps in the
  v1 order (the same view/permute steps without the last transpose). That is the one place the reference is not
  transformers' code, and it is reported in the stage output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")


def _torch():
    import torch

    return torch


def pixel_shuffle_v1(x, scale_factor: float = 0.5):
    """Upstream InternVL's pixel shuffle without the final transpose (the 'v1' token order)."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))


def pick_device(device: Optional[str]) -> str:
    """The requested torch device, checked to be usable; by default the first of cuda, mps, npu, cpu that is."""
    from ..errors import UserError

    torch = _torch()
    if device:
        kind = device.split(":")[0]
        if kind == "npu":
            try:
                import torch_npu  # noqa: F401  (registers the 'npu' device with torch)
            except ImportError as e:
                raise UserError("--device npu needs Ascend's torch_npu package installed next to torch") from e
        available = {"cpu": True, "cuda": torch.cuda.is_available(),
                     "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
                     "npu": bool(hasattr(torch, "npu") and torch.npu.is_available())}
        if not available.get(kind, False):
            raise UserError(f"torch device {device!r} is not available here (torch {torch.__version__}); "
                            f"available: {', '.join(k for k, v in available.items() if v)}")
        return device
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        pass
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    if hasattr(torch, "npu") and torch.npu.is_available():
        return "npu"
    return "cpu"


class ReferenceModel:
    """transformers' InternVL model plus the settings it needs from an original config (ps_version, ids)."""

    def __init__(self, model, ps_version: str = "v2", device: str = "cpu"):
        self.model = model
        self.ps_version = ps_version
        self.device = device
        if ps_version == "v1":
            self.model.model.pixel_shuffle = pixel_shuffle_v1

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @classmethod
    def from_pretrained(cls, path, device: Optional[str] = None, dtype: str = "float32",
                        image_token_id: Optional[int] = None, attn_implementation: str = "eager"):
        torch = _torch()
        from transformers import InternVLForConditionalGeneration

        from ..config import detect_format

        path = Path(path)
        device = pick_device(device)
        raw = json.loads((path / "config.json").read_text())
        fmt = detect_format(raw, str(path / "config.json"))
        torch_dtype = getattr(torch, dtype)
        kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation)
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one load; its per-tensor bar would only clutter the parity report
        try:
            if fmt == "hf":
                model = InternVLForConditionalGeneration.from_pretrained(str(path), **kwargs)
                if image_token_id is not None:
                    model.config.image_token_id = image_token_id
                ps = "v2"
            elif fmt == "original":
                config, state = hf_from_original(path, raw, image_token_id)
                model = InternVLForConditionalGeneration.from_pretrained(None, config=config, state_dict=state,
                                                                         **kwargs)
                ps = raw.get("ps_version", "v1")
            else:
                from ..errors import UserError

                raise UserError(f"{path}: the torch reference runs Hugging Face checkpoints, not converted MLX ones; "
                                "pass the original or -hf directory")
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        model.to(device).eval()
        return cls(model, ps, device)

    # ---- stages ----

    def _pixels(self, pixel_values: np.ndarray):
        torch = _torch()
        pv = torch.from_numpy(np.ascontiguousarray(pixel_values)).permute(0, 3, 1, 2)
        return pv.to(self.device, self.model.dtype)

    def run_stages(self, input_ids: np.ndarray, pixel_values: Optional[np.ndarray],
                   max_new_tokens: int = 16) -> Dict[str, np.ndarray]:
        """Every stage for one request, as float32 numpy arrays (tokens as int64).

        vision_features `[P, 1+N, C]` (ViT hidden state at the selected layer, CLS first), image_features
        `[P, n, D]`, inputs_embeds `[B, L, D]`, logits `[B, L, V]`, greedy_tokens `[B, n]` (n = max_new_tokens, no early
        stop) and decode_logits `[B, n, V]` (the logits each greedy token was picked from). `input_ids` is `[B, L]`
        (rows of equal length, no padding).
        """
        torch = _torch()
        m = self.model
        cfg = m.config
        out: Dict[str, np.ndarray] = {}
        self.reset_rope_state()
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64)).to(self.device)
        with torch.no_grad():
            embeds = m.get_input_embeddings()(ids)
            pv = None
            if pixel_values is not None:
                pv = self._pixels(pixel_values)
                vt = m.model.vision_tower(pixel_values=pv, output_hidden_states=True, return_dict=True)
                layer = cfg.vision_feature_layer
                hidden = vt.last_hidden_state if layer == -1 else vt.hidden_states[layer]
                out["vision_features"] = hidden.float().cpu().numpy()
                feats = m.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output
                out["image_features"] = feats.float().cpu().numpy()
                mask = (ids == cfg.image_token_id).unsqueeze(-1)
                embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
            out["inputs_embeds"] = embeds.float().cpu().numpy()
            logits = m(input_ids=ids, pixel_values=pv).logits
            out["logits"] = logits.float().cpu().numpy()
            if max_new_tokens:
                out["greedy_tokens"], out["decode_logits"] = self.greedy(ids, pv, max_new_tokens)
        return out

    def reset_rope_state(self) -> None:
        """Put dynamic-NTK rotary embeddings back in their freshly loaded state.

        transformers' dynamic RoPE keeps the frequencies of the longest sequence it has seen and reuses them for any
        later sequence that is still longer than `max_position_embeddings`, so a result would depend on earlier
        requests. Each request here starts as a newly loaded model does (the MLX side is stateless).
        """
        for module in self.model.modules():
            if getattr(module, "rope_type", None) == "dynamic" and hasattr(module, "original_inv_freq"):
                module.register_buffer("inv_freq", module.original_inv_freq.clone(), persistent=False)
                module.max_seq_len_cached = module.original_max_seq_len

    def greedy(self, ids, pv, max_new_tokens: int):
        """Greedy decoding with transformers' KV cache, exactly `max_new_tokens` steps (eos does not stop it).

        Returns tokens `[B, n]` and the logits each token was chosen from, `[B, n, V]`.
        """
        torch = _torch()
        m = self.model
        self.reset_rope_state()
        tokens, steps = [], []
        with torch.no_grad():
            out = m(input_ids=ids, pixel_values=pv, use_cache=True)
            for i in range(max_new_tokens):
                if i:
                    out = m(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True)
                last = out.logits[:, -1]
                steps.append(last.float())
                tokens.append(last.argmax(-1, keepdim=True))
        return torch.cat(tokens, dim=1).cpu().numpy(), torch.stack(steps, dim=1).cpu().numpy()


def hf_from_original(src: Path, raw: dict, image_token_id: Optional[int]):
    """An original-layout checkpoint as (`InternVLConfig`, transformers state dict with legacy prefixes), in
    memory: transformers' own loader then applies its key handling (legacy prefixes, per-expert MoE keys, ties)."""
    from safetensors.torch import load_file
    from transformers import InternVLConfig

    from .flash import ROUTER_PREFIXES
    from .layout import original_config_to_hf, original_to_hf

    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(f)))
    # A Flash checkpoint's router has no place in transformers' InternVL; its reference is reference/flash.py.
    state = {k: v for k, v in state.items() if not k.startswith(ROUTER_PREFIXES)}
    hf_state = original_to_hf(state, raw["llm_config"])
    kwargs = original_config_to_hf(raw)
    if image_token_id is not None:
        kwargs["image_token_id"] = image_token_id
    # An lm_head tensor means an untied head, whatever the config says (as the MLX loader decides).
    tie = "language_model.lm_head.weight" not in hf_state
    kwargs["tie_word_embeddings"] = tie
    kwargs["text_config"]["tie_word_embeddings"] = tie
    return InternVLConfig(**kwargs), hf_state

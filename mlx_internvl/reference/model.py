"""The torch reference: transformers' own InternVL classes on any torch device, with every stage captured.

- `-hf` checkpoints load with `InternVLForConditionalGeneration.from_pretrained` as they are.
- Original-layout checkpoints are mapped in memory (`layout.original_to_hf`, the official converter's mapping;
  InternLM2 becomes Llama) into a temporary `-hf` directory that transformers then loads, so its own key
  handling (legacy prefixes, fused MoE experts, tied heads) applies. No checkpoint remote code is run.
- transformers only implements pixel shuffle `v2`; for `ps_version: v1` checkpoints the reference swaps in the
  v1 order (the same view/permute steps without the last transpose). That is the one place the reference is not
  transformers' code, and it is reported in the stage output.
"""

from __future__ import annotations

import json
import tempfile
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
    torch = _torch()
    if device:
        return device
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
        if fmt == "hf":
            model = InternVLForConditionalGeneration.from_pretrained(str(path), **kwargs)
            if image_token_id is not None:
                model.config.image_token_id = image_token_id
            ps = "v2"
        elif fmt == "original":
            with tempfile.TemporaryDirectory(prefix="mlx-internvl-ref-") as tmp:
                write_hf_from_original(path, raw, Path(tmp), image_token_id)
                model = InternVLForConditionalGeneration.from_pretrained(tmp, **kwargs)
            ps = raw.get("ps_version", "v1")
        else:
            raise ValueError(f"{path}: the torch reference runs Hugging Face checkpoints, not converted MLX ones")
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
        `[P, n, D]`, inputs_embeds `[1, L, D]`, logits `[1, L, V]`, greedy_tokens `[max_new_tokens]` (no early stop).
        """
        torch = _torch()
        m = self.model
        cfg = m.config
        out: Dict[str, np.ndarray] = {}
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
            out["greedy_tokens"] = self.greedy(ids, pv, max_new_tokens)
        return out

    def greedy(self, ids, pv, max_new_tokens: int) -> np.ndarray:
        """Greedy continuation of exactly `max_new_tokens` tokens (eos does not stop it) with transformers' cache."""
        torch = _torch()
        m = self.model
        with torch.no_grad():
            out = m(input_ids=ids, pixel_values=pv, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens = [tok]
            for _ in range(max_new_tokens - 1):
                out = m(input_ids=tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(tok)
        return torch.cat(tokens, dim=1)[0].cpu().numpy()


def write_hf_from_original(src: Path, raw: dict, dst: Path, image_token_id: Optional[int]) -> None:
    """Write an original-layout checkpoint as a transformers (legacy-prefix) checkpoint in `dst`."""
    from safetensors.torch import load_file, save_file
    from transformers import InternVLConfig

    from .layout import original_config_to_hf, original_to_hf

    files = sorted(src.glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    hf_state = original_to_hf(state, raw["llm_config"])
    kwargs = original_config_to_hf(raw)
    if image_token_id is not None:
        kwargs["image_token_id"] = image_token_id
    if "language_model.lm_head.weight" not in hf_state:
        kwargs["tie_word_embeddings"] = True
        kwargs["text_config"]["tie_word_embeddings"] = True
    else:
        kwargs["tie_word_embeddings"] = False
        kwargs["text_config"]["tie_word_embeddings"] = False
    InternVLConfig(**kwargs).save_pretrained(str(dst))
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})

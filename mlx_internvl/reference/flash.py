"""The torch reference of InternVL3.5-Flash's router: the checkpoint's own remote code, stage by stage.

transformers has no Flash model, so the only torch implementation of the router is the `modeling_internvl_chat.py`
that ships next to a Flash checkpoint's weights. It is found through the folder's `auto_map` as
`AutoModel.from_pretrained(..., trust_remote_code=True)` finds it (`AutoConfig`, then transformers'
`get_class_from_dynamic_module`), built from its config and filled by a strict load of the folder's tensors: its
class skips the `post_init` that transformers 5's `from_pretrained` needs to finish a model.

The stages come from upstream's own generation path, `generate_flash`, run once with its steps observed: the
pooled vector (a hook on `pooling_before_gating`), `extract_feature_flash`'s gate, mlp2 and mlp1 rows, the decisions
and ids `compress_visual_tokens_in_sentence` gets and returns, and the merged embeddings it hands to
`language_model.generate` (which is not run: the routed prompt's logits are one forward pass over them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import numpy as np

from ..errors import UserError

AUTO_CLASSES = ("AutoConfig", "AutoModel")
ROUTER_PREFIXES = ("mlp2.", "pooling_before_gating.", "gating.")  # the Flash tensors transformers' InternVL lacks


def is_flash(raw: dict) -> bool:
    """Whether a config.json has the router on (upstream's `generate` then takes `generate_flash`)."""
    return bool(raw.get("flash_mode"))


def check_remote_code(path: Path, raw: dict) -> None:
    """The folder must name its config and model classes in `auto_map` and hold the files they live in."""
    auto_map = raw.get("auto_map") or {}
    missing = [c for c in AUTO_CLASSES if c not in auto_map]
    files = sorted({auto_map[c].split(".")[0] + ".py" for c in AUTO_CLASSES if c in auto_map})
    absent = [f for f in files if not (path / f).is_file()]
    if missing or absent:
        what = (f"its config.json auto_map lacks {', '.join(missing)}" if missing else
                f"the folder lacks {', '.join(absent)}")
        raise UserError(
            f"{path}: an InternVL3.5-Flash checkpoint, whose router's only torch reference is the checkpoint's own "
            f"remote code, but {what}. Use a folder with the Flash repository's code files next to its weights "
            "(modeling_internvl_chat.py, configuration_internvl_chat.py, modeling_intern_vit.py, conversation.py "
            "and config.json's auto_map), e.g. `hf download OpenGVLab/InternVL3_5-1B-Flash --local-dir DIR`.")


def load_flash_reference(path: Path, device: str, dtype: str = "float32"):
    """The checkpoint's own `InternVLChatModel` (its remote code) with the folder's tensors, in eval mode."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    raw = json.loads((path / "config.json").read_text())
    check_remote_code(path, raw)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=True)
    cls = get_class_from_dynamic_module(raw["auto_map"]["AutoModel"], str(path))
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # built in the target dtype: no fp32 copy of a large model
    try:
        with no_init_weights():  # every parameter is loaded (or tied) below: no random init to wait for
            model = cls(config)
    finally:
        torch.set_default_dtype(default)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    _strict_load(model, state, path)
    return model.to(device).eval()


def _strict_load(model, state: dict, path: Path) -> None:
    """`load_state_dict` that lists every unexpected or missing key; a tied parameter (the same tensor as a loaded
    one, e.g. a tied lm_head) need not be in the checkpoint."""
    result = model.load_state_dict(state, strict=False)
    own = model.state_dict(keep_vars=True)
    loaded = {id(own[k]) for k in state if k in own}
    missing = [k for k in result.missing_keys if id(own[k]) not in loaded]
    if missing or result.unexpected_keys:
        raise UserError(f"{path}: the checkpoint's tensors do not fit its remote-code model: missing "
                        f"{missing[:8] or 'none'}, unexpected {result.unexpected_keys[:8] or 'none'}")


def router_stages(model, input_ids: np.ndarray, pixel_values: np.ndarray, image_token_id: int) -> Dict[str, np.ndarray]:
    """One request (`input_ids` `[1, L]`, pixels `[P, S, S, 3]`) through upstream's `generate_flash`:
    router_pooled `[P, C]`, router_p0 `[P]`, router_low `[P, 64, D]` (mlp2), router_full `[P, 256, D]` (mlp1),
    router_decisions `[P]` (True: compressed), router_ids `[L']` and router_logits `[1, L', V]`."""
    import torch

    device = next(model.parameters()).device
    seen = _observe(model)
    try:
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64)).to(device)
        pv = torch.from_numpy(np.ascontiguousarray(pixel_values)).permute(0, 3, 1, 2).to(device, model.dtype)
        model.img_context_token_id = int(image_token_id)
        with torch.no_grad():
            model.generate_flash(pixel_values=pv, input_ids=ids, attention_mask=torch.ones_like(ids))
            logits = model.language_model(inputs_embeds=seen["embeds"]).logits
    finally:
        _restore(model, seen)
    low, full, gate = seen["flash"]
    as_np = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    return {"router_pooled": as_np(seen["pooled"]), "router_p0": as_np(gate[:, 0]), "router_low": as_np(low),
            "router_full": as_np(full), "router_decisions": seen["decisions"].cpu().numpy().astype(bool),
            "router_ids": seen["ids"].cpu().numpy().astype(np.int64), "router_logits": as_np(logits)}


def _observe(model) -> dict:
    """Wrap (on the instance) the steps of `generate_flash` whose results are stages; the LLM's `generate` only
    records the embeddings it is given."""
    seen: dict = {}
    extract, compress = model.extract_feature_flash, model.compress_visual_tokens_in_sentence

    def on_extract(*args, **kwargs):
        seen["flash"] = extract(*args, **kwargs)
        return seen["flash"]

    def on_compress(**kwargs):
        out = compress(**kwargs)
        seen["decisions"], seen["ids"] = kwargs["gate_result"].clone(), out[1].clone()
        return out

    def on_generate(inputs_embeds=None, **kwargs):
        seen["embeds"] = inputs_embeds

    seen["hook"] = model.pooling_before_gating.register_forward_hook(
        lambda module, args, out: seen.__setitem__("pooled", out))
    model.extract_feature_flash, model.compress_visual_tokens_in_sentence = on_extract, on_compress
    model.language_model.generate = on_generate
    return seen


def _restore(model, seen: dict) -> None:
    seen.pop("hook").remove()
    for obj, name in ((model, "extract_feature_flash"), (model, "compress_visual_tokens_in_sentence"),
                      (model.language_model, "generate")):
        obj.__dict__.pop(name, None)  # the class's own method shows through again

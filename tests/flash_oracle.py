"""The upstream InternVL3.5-Flash model (the Flash repos' own `modeling_internvl_chat.py`) around a tiny
transformers checkpoint, and the same weights written as an original-layout Flash checkpoint for the MLX side.

The ViT, mlp1 and the LLM are the built case's transformers modules; the Flash modules (`mlp2`,
`pooling_before_gating`, `gating`) are upstream's own classes, filled with seeded noise; their state dict, under
upstream's names, is added to the original-layout checkpoint, with the `flash_*` config keys.

Upstream's modeling file is not part of this project (its code stays out of our commits): give its folder in
`MLX_INTERNVL_UPSTREAM_FLASH` (a copy of `modeling_internvl_chat.py` from an `OpenGVLab/InternVL3_5-*-Flash` repo)
and the tests that compare against it run; without it they are skipped with that reason. Its sibling imports
(`configuration_internvl_chat`, `conversation`, `modeling_intern_vit`) are the small stand-ins in
tests/upstream_flash/.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

UPSTREAM_ENV = "MLX_INTERNVL_UPSTREAM_FLASH"

FLASH_PREFIXES = ("mlp2", "pooling_before_gating", "gating")


def _vision_adapter(tower):
    import torch

    class Vision(torch.nn.Module):
        """transformers' InternViT under upstream's call (`last_hidden_state`, CLS first)."""

        def __init__(self):
            super().__init__()
            self.tower = tower

        def forward(self, pixel_values, output_hidden_states=False, return_dict=True):
            return self.tower(pixel_values=pixel_values)

    return Vision()


def _randomize(modules, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in modules:
            for name, p in sorted(module.named_parameters()):
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
                if p.ndim == 1 and name.endswith("weight"):  # every 1-D weight here is a LayerNorm's
                    p.copy_(1.0 + 0.1 * noise)
                elif p.ndim == 1:
                    p.copy_(0.1 * noise)
                else:
                    p.copy_(noise * (1.5 / p.shape[-1] ** 0.5))


def upstream_modeling():
    """Upstream's `modeling_internvl_chat` module, loaded from `$MLX_INTERNVL_UPSTREAM_FLASH` (skip without it)."""
    name = "upstream_flash.modeling_internvl_chat"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(os.environ.get(UPSTREAM_ENV, "")) / "modeling_internvl_chat.py"
    if not os.environ.get(UPSTREAM_ENV) or not path.is_file():
        pytest.skip(f"the upstream Flash modeling file is not given: set {UPSTREAM_ENV} to a folder holding "
                    "modeling_internvl_chat.py from an OpenGVLab/InternVL3_5-*-Flash repo")
    import upstream_flash  # noqa: F401  (the package its relative imports resolve in)

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def upstream_flash(built, relative: float, absolute: float, seed: int = 11):
    """The upstream Flash `InternVLChatModel` (fp32, eval) sharing the built case's ViT, mlp1 and LLM."""
    import torch
    from transformers import AutoModelForCausalLM
    from upstream_flash.configuration_internvl_chat import InternVLChatConfig

    InternVLChatModel = upstream_modeling().InternVLChatModel

    hf = built.model
    text_cfg = hf.config.text_config
    lm = AutoModelForCausalLM.from_config(text_cfg).eval()
    lm.model.load_state_dict(hf.model.language_model.state_dict())
    lm.lm_head.load_state_dict(hf.lm_head.state_dict())
    vc = hf.config.vision_config
    cfg = InternVLChatConfig(
        vision_config=dict(hidden_size=vc.hidden_size, image_size=vc.image_size[0], patch_size=vc.patch_size[0]),
        llm_config=text_cfg, force_image_size=vc.image_size[0], select_layer=-1, template="internvl2_5",
        downsample_ratio=0.5, ps_version="v2", flash_mode=True, flash_relative_threshold=relative,
        flash_absolute_threshold=absolute)
    torch.manual_seed(seed)
    m = InternVLChatModel(cfg, vision_model=_vision_adapter(hf.model.vision_tower), language_model=lm)
    proj = hf.model.multi_modal_projector
    m.mlp1[0].load_state_dict(proj.layer_norm.state_dict())
    m.mlp1[1].load_state_dict(proj.linear_1.state_dict())
    m.mlp1[3].load_state_dict(proj.linear_2.state_dict())
    _randomize([(p, getattr(m, p)) for p in FLASH_PREFIXES], seed)
    return m.eval()


def write_flash_checkpoint(built, upstream, out: Path, flash_mode=True) -> Path:
    """The built case's original-layout checkpoint plus the upstream model's Flash tensors and config keys."""
    from safetensors.torch import load_file, save_file

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(built.original_dir, out)
    state = load_file(str(out / "model.safetensors"))
    for prefix in FLASH_PREFIXES:
        for k, v in getattr(upstream, prefix).state_dict().items():
            state[f"{prefix}.{k}"] = v.detach().clone().contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(flash_mode=flash_mode, flash_relative_threshold=upstream.flash_relative_threshold,
               flash_absolute_threshold=upstream.flash_absolute_threshold)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


STAND_INS = Path(__file__).parent / "upstream_flash"


def add_remote_code(ckpt: Path) -> Path:
    """Make a Flash checkpoint folder load as remote code (`trust_remote_code=True`), as a released one does: the
    upstream modeling file (from `$MLX_INTERNVL_UPSTREAM_FLASH`, at test time only), the stand-in sibling modules
    and config.json's `auto_map`."""
    upstream_modeling()  # skips without the upstream file
    shutil.copyfile(Path(os.environ[UPSTREAM_ENV]) / "modeling_internvl_chat.py", ckpt / "modeling_internvl_chat.py")
    for f in STAND_INS.glob("*.py"):
        if f.name != "__init__.py":
            shutil.copyfile(f, ckpt / f.name)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                       "AutoModel": "modeling_internvl_chat.InternVLChatModel"}
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    return ckpt


class Spy:
    """Records what upstream's `generate_flash` decided: per-tile decisions, the compressed ids, the merged
    embeddings (filled in place after the compression returns) and the tokens `language_model.generate` made."""

    def __init__(self, m):
        self.calls = []
        compress, generate = m.compress_visual_tokens_in_sentence, m.language_model.generate

        def spy_compress(**kw):
            out = compress(**kw)
            self.calls.append({"decisions": kw["gate_result"].clone().numpy(), "ids": out[1].clone().numpy(),
                               "embeds": out[0]})
            return out

        def spy_generate(*a, **kw):
            tokens = generate(*a, **kw)
            self.tokens = tokens[0].tolist()
            return tokens

        m.compress_visual_tokens_in_sentence = spy_compress
        m.language_model.generate = spy_generate

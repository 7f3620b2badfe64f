"""LoRA / DoRA layers on InternVL, with mlx-lm's own tuner classes, and the adapter files that hold them.

Everything is frozen first; then mlx-lm's `linear_to_lora_layers` swaps the chosen linear layers of the LLM decoder
(and, when asked, of the ViT encoder) for `LoRALinear` / `DoRALinear` / `LoRASwitchLinear`, whose low-rank factors
are the only trainable tensors. The projector `mlp1` is either frozen, LoRA-adapted, or trained in full. On an
InternVL3.5-Flash checkpoint the router and `mlp2` stay frozen unless `train_flash` asks for one of ViCO's stages
(`lora/vico.py`): "mlp2" trains `mlp2` in full beside the adapters; "router" trains the router alone (its pooling and
gating network), with no adapter anywhere else.

`adapter_config.json` records the exact layout (resolved target names, layer count, rank, scale, dropout) so
`load_adapters` rebuilds the same modules before loading `adapters.safetensors` strictly: every adapter tensor the
layout implies must be present with its shape, and nothing else. mlx-lm's `scale` multiplies `x @ A @ B`; it is
`alpha / rank`, the PEFT convention, and both numbers are stored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from .errors import UserError
from .files import save_safetensors
from .validate import integer, naming, number
from .weights import weight_mismatches

logger = logging.getLogger("mlx_internvl")
ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
VISION_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
PROJECTOR_MODES = (None, "lora", "full")
FLASH_MODES = (None, "mlp2", "router")
ROUTER_MODULES = ("pooling_before_gating", "gating")
# MoE routers are left out of the default "all linear layers": adapting the expert choice is rarely wanted.
DEFAULT_EXCLUDE = ("mlp.gate", "mlp.router")  # MoE routers: Qwen3-MoE, GPT-OSS


@dataclass
class LoraConfig:
    """What to adapt. `targets`: names of linear layers inside an LLM decoder layer, either a leaf (`q_proj`) or a
    relative path (`self_attn.q_proj`); None means every linear layer but MoE routers. `num_layers`: adapt the last
    N decoder layers (None: all)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Optional[List[str]] = None
    num_layers: Optional[int] = None
    dora: bool = False
    train_vision: bool = False
    train_projector: Optional[str] = None
    train_flash: Optional[str] = None  # a Flash checkpoint's ViCO stage: "mlp2" (consistency) or "router"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        integer("--rank", self.rank, minimum=1)
        number("--alpha", self.alpha, minimum=0.0, min_open=True, fix="the LoRA scale is alpha / rank")
        number("--dropout", self.dropout, minimum=0.0, maximum=1.0, max_open=True)
        if self.train_projector not in PROJECTOR_MODES:
            raise UserError(f"train_projector must be one of lora, full or None, got {self.train_projector!r}")
        if self.train_flash not in FLASH_MODES:
            raise UserError(f"train_flash must be one of mlp2, router or None, got {self.train_flash!r}")
        if self.train_flash == "router" and (self.train_vision or self.train_projector):
            raise UserError("--train-flash router trains the router alone (the whole model stays frozen, as in "
                            "ViCO's router stage); drop --train-vision / --train-projector")
        integer("--num-layers", self.num_layers, minimum=1, allow_none=True)
        if self.targets is not None and (not isinstance(self.targets, (list, tuple))
                                         or not all(isinstance(t, str) and t for t in self.targets)):
            raise UserError(f"--targets: expected layer names such as q_proj,v_proj, got {self.targets!r}")

    def to_json(self, **extra) -> dict:
        out = dataclasses.asdict(self)
        out.update(fine_tune_type="dora" if self.dora else "lora", scale=self.scale)
        # The same numbers under mlx-lm's adapter_config keys, for readers that know that format.
        out["lora_parameters"] = {"rank": self.rank, "scale": self.scale, "dropout": self.dropout,
                                  "keys": self.targets}
        out.update(extra)
        return out

    @classmethod
    def from_json(cls, data: dict, where: str = "adapter_config.json") -> LoraConfig:
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in names})
        with naming(where):
            config.validate()
        return config


def _linear_names(layer: nn.Module) -> List[str]:
    return [name for name, m in layer.named_modules() if isinstance(m, LINEAR_TYPES) or hasattr(m, "to_lora")]


def resolve_targets(model, targets: Optional[Sequence[str]]) -> List[str]:
    """Relative paths (inside one decoder layer) of the linear layers the targets name; errors list the choices."""
    available = _linear_names(model.language_model.layers[0])
    if targets is None:
        return sorted(n for n in available if n not in DEFAULT_EXCLUDE)
    chosen, unknown = [], []
    for t in targets:
        hits = [n for n in available if n == t or n.endswith("." + t)]
        if not hits:
            unknown.append(t)
        chosen += sorted(h for h in hits if h not in chosen)
    if unknown:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in available})
        raise UserError(f"--targets {','.join(unknown)}: no such linear layer in this model's decoder layers. "
                        f"Available: {', '.join(leaves)} (or full paths: {', '.join(sorted(available))})")
    return chosen


def apply_lora(model, config: LoraConfig) -> List[str]:
    """Freeze `model`, insert the adapter layers `config` asks for, and return the resolved LLM targets."""
    config.validate()
    was_training = model.training
    targets = resolve_targets(model, config.targets)
    n_layers = len(model.language_model.layers)
    num = n_layers if config.num_layers is None else config.num_layers
    if num > n_layers:
        raise UserError(f"--num-layers {num} is more than the model's {n_layers} decoder layers")
    if config.train_flash and not model.config.is_flash:
        raise UserError(f"--train-flash {config.train_flash} needs an InternVL3.5-Flash checkpoint (flash_mode in "
                        "its config.json, with the router and mlp2 weights); this model has no router")
    _check_full_training(model, config)
    model.freeze()
    if config.train_flash == "router":  # ViCO's router stage: nothing but the router learns
        for name in ROUTER_MODULES:
            getattr(model, name).unfreeze()
        model.train(was_training)
        return []
    params = {"rank": config.rank, "scale": config.scale, "dropout": config.dropout}
    try:
        linear_to_lora_layers(model.language_model, num, dict(params, keys=set(targets)), use_dora=config.dora)
        if config.train_vision:
            enc = model.vision_model.encoder
            linear_to_lora_layers(enc, len(enc.layers), dict(params, keys=set(VISION_TARGETS)), use_dora=config.dora)
    except ValueError as e:  # mlx-lm refuses DoRA on MoE expert layers
        raise UserError(f"cannot adapt this model as asked: {e}") from e
    if config.train_projector == "lora":
        cls = DoRALinear if config.dora else LoRALinear
        model.mlp1.update_modules(tree_unflatten([
            (name, cls.from_base(getattr(model.mlp1, name), r=config.rank, dropout=config.dropout,
                                 scale=config.scale))
            for name in ("linear_1", "linear_2")
        ]))
    elif config.train_projector == "full":
        model.mlp1.unfreeze()
    if config.train_flash == "mlp2":
        model.mlp2.unfreeze()
    model.train(was_training)
    return targets


def _check_full_training(model, config: LoraConfig) -> None:
    """Refuse to train a quantized module in full: MLX keeps quantized weights frozen, so only its norms would learn."""
    names = (["mlp1"] if config.train_projector == "full" else []) + (["mlp2"] if config.train_flash == "mlp2" else [])
    names += list(ROUTER_MODULES) if config.train_flash == "router" else []
    for name in names:
        if any(isinstance(m, nn.QuantizedLinear) for _, m in getattr(model, name).named_modules()):
            flag = "--train-projector full" if name == "mlp1" else f"--train-flash {config.train_flash}"
            raise UserError(f"{flag} trains {name} in full, but {name} is quantized in this checkpoint (converted "
                            "with the vision tower quantized), and quantized weights cannot be trained. Use a "
                            "conversion that keeps the vision side in full precision.")


def trainable_weights(model) -> Dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(model, adapter_dir: Union[str, Path]) -> Path:
    Path(adapter_dir).mkdir(parents=True, exist_ok=True)
    path = Path(adapter_dir) / ADAPTER_FILE
    save_safetensors(path, trainable_weights(model), {"format": "mlx-internvl-adapters"})
    return path


def read_adapter_config(adapter_dir: Union[str, Path]) -> dict:
    path = Path(adapter_dir).expanduser()
    cfg = path / CONFIG_FILE
    if not path.is_dir():
        raise UserError(f"adapter path {path}: no such directory (it should hold {CONFIG_FILE} and {ADAPTER_FILE})")
    if not cfg.exists():
        raise UserError(f"{cfg}: missing; is {path} an adapter directory written by mlx-internvl lora?")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg}: not valid JSON ({e})") from e


def check_adapter_weights(model, weights: Dict[str, mx.array], where: str) -> None:
    expected = {k: v.shape for k, v in trainable_weights(model).items()}
    problems = weight_mismatches(expected, weights, limit=6)
    if problems:
        raise UserError(f"{where}: adapter tensors do not fit this model ({problems}). Was it trained on a "
                        "different base model?")


def load_adapters(model, adapter_path: Union[str, Path]):
    """Rebuild the adapter layers recorded in `adapter_path/adapter_config.json` on `model` and load their weights.

    Returns the model (changed in place). The base weights are untouched; `fuse` merges them.
    """
    adapter_dir = Path(adapter_path).expanduser()
    raw = read_adapter_config(adapter_dir)
    config = LoraConfig.from_json(raw)
    trained_on = raw.get("base_quantization")
    if trained_on and not model.config.quantization:
        logger.warning("%s was trained on a %s-bit quantized base, and this base is not quantized: outputs will "
                       "differ a little from training. Use the same quantized base (convert --quantize --q-bits %s) "
                       "to match.", adapter_dir, trained_on.get("bits"), trained_on.get("bits"))
    apply_lora(model, config)
    file = adapter_dir / ADAPTER_FILE
    if not file.exists():
        raise UserError(f"{file}: missing; the adapter directory has a config but no weights")
    try:
        weights = mx.load(str(file))
    except Exception as e:  # mx.load raises RuntimeError/ValueError for truncated or foreign files
        raise UserError(f"{file}: cannot read safetensors ({e})") from e
    check_adapter_weights(model, weights, str(file))
    model.load_weights(list(weights.items()), strict=False)
    return model


def adapter_modules(model) -> List[tuple]:
    """(path, module) of every LoRA/DoRA layer in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear, LoRASwitchLinear))]

"""Weights in and out of a model: the converted MLX directory, strict loading, and quantization.

- A converted directory is `config.json` (with `mlx_internvl_format`) plus safetensors shards that carry the
  `format: mlx` marker (mlx-lm's convention): the marker is checked on load instead of guessing layouts by shape.
- Loading is strict, and a mismatch lists every missing, unexpected or misshapen key, with the file (or source key)
  it came from (`weight_mismatches`, shared with adapter loading).
- `quantize` writes the quantization entry that `apply_quantization` reads back, per-layer overrides included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig, config_from_mlx, detect_format
from .errors import CheckpointError, UserError
from .files import (
    LAYOUT_FILES,
    TOKENIZER_FILES,
    copy_model_files,
    read_json,
    save_json,
    save_weights,
    staged_output,
)
from .model import InternVLChatModel
from .tokenizer import IMG_CONTEXT, token_id
from .validate import check_config_json, naming

MLX_FORMAT_VERSION = 1
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def parse_dtype(dtype: Union[None, str, mx.Dtype]) -> Optional[mx.Dtype]:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def cast_floats(weights: Dict[str, mx.array], dtype: Optional[mx.Dtype]) -> Dict[str, mx.array]:
    if dtype is None:
        return weights
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def build_model(config: ModelConfig) -> InternVLChatModel:
    model = InternVLChatModel(config)
    model.eval()
    return model


def read_config(path: Path) -> Tuple[dict, str]:
    """`(config.json as a dict, its format: 'mlx' | 'original' | 'hf')` of a model directory."""
    where = str(Path(path) / "config.json")
    raw = read_json(Path(path) / "config.json")
    if not isinstance(raw, dict):
        check_config_json(raw, where)  # says what the top level should be
    fmt = detect_format(raw, where)
    check_config_json(raw, where, fmt)
    return raw, fmt


def weight_mismatches(expected: Dict[str, tuple], weights: Dict[str, mx.array],
                      source: Optional[Callable[[str], Optional[str]]] = None, limit: int = 8,
                      expecter: str = "the model needs") -> str:
    """'' when `weights` has exactly the keys and shapes of `expected`; otherwise every problem, in one line
    (`source(key)` says where a tensor came from; `expecter` names the side that fixed the expected shapes)."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(weights[k].shape) != tuple(expected[k]))

    def where(k):
        found = source(k) if source else None
        return f" (from {found})" if found else ""

    def listed(keys, with_source=False):
        shown = ", ".join(k + (where(k) if with_source else "") for k in keys[:limit])
        return shown + (" ..." if len(keys) > limit else "")

    lines = []
    if missing:
        lines.append(f"missing {len(missing)} tensors: " + listed(missing))
    if unexpected:
        lines.append(f"unexpected {len(unexpected)} tensors: " + listed(unexpected, True))
    for k in wrong[:limit]:
        lines.append(f"{k}{where(k)} has shape {tuple(weights[k].shape)}, {expecter} {tuple(expected[k])}")
    return "; ".join(lines)


def load_weights_checked(model: nn.Module, weights: Dict[str, mx.array], source=None,
                         config_path: str = "config.json") -> None:
    """`model.load_weights(strict=True)`, but every missing, unexpected or misshapen key is listed, with the file
    (and source key) it came from when `source(key)` can tell, and `config_path` named as the other side."""
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    problems = weight_mismatches(expected, weights, source, expecter="the config implies")
    if problems:
        raise CheckpointError(f"the weights do not match {config_path}: {problems}. Use the config.json that came "
                              "with these weights (or the weights that belong to it).")
    model.load_weights(list(weights.items()), strict=True)


def apply_quantization(model: nn.Module, quantization: dict, weights: Dict[str, mx.array]) -> None:
    """Swap in quantized layers wherever the weights carry `.scales` (per-path overrides as mlx-lm writes them)."""

    def predicate(path, module):
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(model, quantization["group_size"], quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def quantize(model: nn.Module, bits: int, group_size: int, quantize_vision: bool = False) -> dict:
    """Quantize the LLM's linear and embedding layers (and, if asked, the vision tower and projector).

    Returns the `quantization` config entry: defaults plus the per-layer overrides the backbone asks for
    (mlx-lm's `quant_predicate`, e.g. 8-bit MoE routers), in the form `apply_quantization` reads back.
    """
    if bits not in (2, 3, 4, 5, 6, 8):
        raise UserError(f"--q-bits {bits} is not supported; use 2, 3, 4, 5, 6 or 8")
    if group_size not in (32, 64, 128):
        raise UserError(f"--q-group-size {group_size} is not supported; use 32, 64 or 128")
    config = {"group_size": group_size, "bits": bits, "mode": "affine"}
    lm_predicate = getattr(model.language_model, "quant_predicate", None)

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        if not path.startswith("language_model.") and not quantize_vision:
            return False
        if path.startswith("vision_model.embeddings"):
            return False  # the patch conv has no quantized form
        if lm_predicate is not None and path.startswith("language_model."):
            choice = lm_predicate(path[len("language_model."):], module)
            if isinstance(choice, dict):
                config[path] = choice
            return choice
        return True

    nn.quantize(model, group_size, bits, class_predicate=predicate)
    return config


def _mlx_weights(path: Path):
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no model*.safetensors files in this converted model directory")
    weights, origin = {}, {}
    for f in files:
        try:
            tensors, meta = mx.load(str(f), return_metadata=True)
        except Exception as e:  # mx.load raises RuntimeError/ValueError with the reason
            raise CheckpointError(f"{f}: cannot read safetensors ({e}); convert the model again") from e
        if (meta or {}).get("format") != "mlx":
            raise CheckpointError(
                f"{f}: no 'format: mlx' marker in the safetensors metadata, so it was not written by "
                "mlx-internvl convert. Convert the original checkpoint again."
            )
        weights.update(tensors)
        origin.update({k: f.name for k in tensors})
    return weights, origin


def load_mlx_model(path: Path, raw: dict, dtype: Optional[mx.Dtype] = None) -> InternVLChatModel:
    """The (lazy) model of a converted MLX directory whose config.json is `raw`."""
    if raw.get("mlx_internvl_format") != MLX_FORMAT_VERSION:
        raise UserError(
            f"{path / 'config.json'}: written by format version {raw.get('mlx_internvl_format')}, this "
            f"mlx-internvl reads version {MLX_FORMAT_VERSION}; convert the model again"
        )
    with naming(path / "config.json"):
        config = config_from_mlx(raw, path / "config.json")
    config.source_path = str(path)
    if config.image_token_id is None:
        config.image_token_id = token_id(path, IMG_CONTEXT)
    weights, origin = _mlx_weights(path)
    model = build_model(config)
    if config.quantization:
        apply_quantization(model, config.quantization, weights)
    load_weights_checked(model, cast_floats(weights, dtype), origin.get, str(path / "config.json"))
    return model


def save_config(config: ModelConfig, path: Path) -> None:
    data = config.to_dict()
    data.pop("source_path", None)  # where this copy was loaded from; the directory written is its own source
    data["mlx_internvl_format"] = MLX_FORMAT_VERSION
    data["architectures"] = ["InternVLChatModel"]
    save_json(path / "config.json", data)


def save_mlx_model(weights: Dict[str, mx.array], config: ModelConfig, out: Path, source_dir: Optional[Path] = None,
                   force: bool = False, remote_code: bool = False, card: Optional[str] = None) -> Path:
    """Write a converted MLX directory (weights, config, the source's tokenizer files, the model card text `card`
    as README.md) at `out`, atomically. `weights` is emptied as it is written."""
    out = Path(out).expanduser()
    with staged_output(out, force) as tmp:
        save_weights(weights, tmp)
        save_config(config, tmp)
        copy_model_files(source_dir, tmp, TOKENIZER_FILES + LAYOUT_FILES, remote_code=remote_code)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
    return out

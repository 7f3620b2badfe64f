"""Loading a model from a converted MLX directory, a Hugging Face directory of either layout, or a hub repo id.

HF checkpoints are converted in memory with the same key plan as `mlx-internvl convert`; nothing from the
checkpoint's remote code (`*.py`) is imported or even downloaded.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig, config_from_hf, config_from_mlx, detect_format
from .errors import CheckpointError, UserError
from .model import InternVLChatModel

MLX_FORMAT_VERSION = 1
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def parse_dtype(dtype: Union[None, str, mx.Dtype]) -> Optional[mx.Dtype]:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_model_path(path_or_repo: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local directory as is; otherwise a hub repo id, downloaded (or found in the cache) with huggingface-hub.
    Hub errors (offline, unreachable, no such repo) are `UserError`s that say what to do; see `mlx_internvl.hub`."""
    from .hub import download, is_repo_id

    p = Path(path_or_repo).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{p}: expected a model directory, got a file")
        return p
    text = str(path_or_repo)
    if not is_repo_id(text):
        raise UserError(f"{text}: no such directory, and it is not a hub repo id of the form 'owner/name'")
    return download(text, revision)


@contextmanager
def naming(path: Path):
    """Prefix a config error with the file it came from, when the message does not name it already."""
    try:
        yield
    except UserError as e:
        if str(path) in str(e):
            raise
        raise type(e)(f"{path}: {e}") from e


def build_model(config: ModelConfig) -> InternVLChatModel:
    model = InternVLChatModel(config)
    model.eval()
    return model


def apply_quantization(model: nn.Module, quantization: dict, weights: Dict[str, mx.array]) -> None:
    """Swap in quantized layers wherever the weights carry `.scales` (per-path overrides as mlx-lm writes them)."""

    def predicate(path, module):
        if path in quantization:
            return quantization[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(model, quantization["group_size"], quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def load_weights_checked(model: nn.Module, weights: Dict[str, mx.array], source=None,
                         config_path: str = "config.json") -> None:
    """`model.load_weights(strict=True)`, but every missing, unexpected or misshapen key is listed, with the file
    (and source key) it came from when `source(key)` can tell, and `config_path` named as the other side."""
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(weights[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        def where(k):
            return f" (from {source(k)})" if source else ""

        lines = []
        if missing:
            lines.append(f"missing {len(missing)} tensors: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            lines.append(f"unexpected {len(unexpected)} tensors: "
                         + ", ".join(k + where(k) for k in unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
        for k in wrong[:8]:
            lines.append(f"{k}{where(k)} has shape {tuple(weights[k].shape)}, the config implies {tuple(expected[k])}")
        raise CheckpointError(
            f"the weights do not match {config_path}: " + "; ".join(lines)
            + ". Use the config.json that came with these weights (or the weights that belong to it)."
        )
    model.load_weights(list(weights.items()), strict=True)


def read_config(path: Path) -> Tuple[dict, str]:
    from .convert.checkpoint import read_json

    from .validate import check_config_json

    where = str(path / "config.json")
    raw = read_json(path / "config.json")
    if not isinstance(raw, dict):
        check_config_json(raw, where)  # says what the top level should be
    fmt = detect_format(raw, where)
    check_config_json(raw, where, fmt)
    return raw, fmt


def hf_weights(path: Path, raw: dict, dtype: Optional[mx.Dtype] = None):
    """Convert an HF checkpoint's tensors in memory (lazily). Returns (config, weights, source-describer)."""
    from .convert.checkpoint import Checkpoint
    from .convert.keymap import build_plan

    with naming(path / "config.json"):
        config = config_from_hf(raw, str(path / "config.json"))
    ckpt = Checkpoint(path)
    plan = build_plan(ckpt.keys(), config.source_format, config.llm_config, config.source_llm_architecture)
    # An lm_head tensor means an untied head, whatever the config says (InternVL stores one even for tied bases).
    config.llm_config["tie_word_embeddings"] = "language_model.lm_head.weight" not in plan
    if dtype is None:
        dtype = _checkpoint_dtype(raw)
    weights = {}
    for key, entry in plan.items():
        arr = entry.fn(*[ckpt.get(s) for s in entry.sources])
        if dtype is not None and mx.issubdtype(arr.dtype, mx.floating):
            arr = arr.astype(dtype)
        weights[key] = arr
    ckpt.release()

    def source(key):
        entry = plan.get(key)
        if entry is None:
            return None
        return ", ".join(f"{ckpt.file_of(s).name}:{s}" for s in entry.sources)

    return config, weights, source


def _checkpoint_dtype(raw: dict) -> Optional[mx.Dtype]:
    name = raw.get("torch_dtype") or raw.get("dtype") or (raw.get("llm_config") or raw.get("text_config") or {}).get("torch_dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def mlx_weights(path: Path):
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no model*.safetensors files in this converted model directory")
    weights, origin = {}, {}
    for f in files:
        try:
            tensors, meta = mx.load(str(f), return_metadata=True)
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read safetensors ({e}); convert the model again") from e
        if (meta or {}).get("format") != "mlx":
            raise CheckpointError(
                f"{f}: no 'format: mlx' marker in the safetensors metadata, so it was not written by "
                "mlx-internvl convert. Convert the original checkpoint again."
            )
        weights.update(tensors)
        origin.update({k: f.name for k in tensors})
    return weights, origin


def load_model(
    path_or_repo: Union[str, Path], dtype=None, lazy: bool = False, revision: Optional[str] = None
) -> Tuple[InternVLChatModel, Path]:
    """The MLX model for a converted directory, an HF directory of either layout, or a hub repo id."""
    path = resolve_model_path(path_or_repo, revision)
    dtype = parse_dtype(dtype)
    raw, fmt = read_config(path)
    if fmt == "mlx":
        if raw.get("mlx_internvl_format") != MLX_FORMAT_VERSION:
            raise UserError(
                f"{path / 'config.json'}: written by format version {raw.get('mlx_internvl_format')}, this "
                f"mlx-internvl reads version {MLX_FORMAT_VERSION}; convert the model again"
            )
        with naming(path / "config.json"):
            config = config_from_mlx(raw)
        weights, origin = mlx_weights(path)
        model = build_model(config)
        if config.quantization:
            apply_quantization(model, config.quantization, weights)
        if dtype is not None:
            weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
        load_weights_checked(model, weights, lambda k: origin.get(k), str(path / "config.json"))
    else:
        config, weights, source = hf_weights(path, raw, dtype)
        model = build_model(config)
        load_weights_checked(model, weights, source, str(path / "config.json"))
    # Where tokenizer files (and, for export, remote code) can be found again.
    model.source_path = path
    if not lazy:
        mx.eval(model.parameters())
    return model, path


def load(
    path_or_repo: Union[str, Path],
    dtype=None,
    adapter_path: Optional[Union[str, Path]] = None,
    lazy: bool = False,
    revision: Optional[str] = None,
):
    """`model, processor = load(...)`: accepts a converted MLX directory, an HF directory (original OpenGVLab or
    transformers `-hf` layout) or a hub repo id."""
    from .processing import Processor

    model, path = load_model(path_or_repo, dtype=dtype, lazy=True, revision=revision)
    processor = Processor.from_pretrained(path, model.config)
    if model.image_token_id is None:
        model.image_token_id = processor.image_token_id
        model.config.image_token_id = processor.image_token_id
    if adapter_path is not None:
        from .lora import load_adapters

        load_adapters(model, adapter_path)
    if not lazy:
        mx.eval(model.parameters())
    return model, processor


def save_config(config: ModelConfig, path: Path) -> None:
    data = config.to_dict()
    data["mlx_internvl_format"] = MLX_FORMAT_VERSION
    data["architectures"] = ["InternVLChatModel"]
    with open(path / "config.json", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)

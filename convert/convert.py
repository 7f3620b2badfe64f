"""`mlx-internvl convert`: a Hugging Face checkpoint (either layout) to an MLX directory, optionally quantized.

- Nothing is written until every tensor has been mapped and checked against config.json (names and shapes).
- The output is built in a temporary sibling directory and renamed into place only when complete, so a failed or
  interrupted conversion leaves nothing behind (`staged_output`, shared with export).
- Tensors are read lazily (`mx.load` reads headers only) and evaluated one at a time while writing, so peak memory
  is about one output shard (`SHARD_BYTES`), not the model: see benchmarks/convert_memory.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tqdm import tqdm

from mlx_internvl.errors import UserError
from mlx_internvl.safe_io import check_writable_dir, staged_output
from mlx_internvl.loading import (
    build_model,
    hf_weights,
    load_weights_checked,
    parse_dtype,
    read_config,
    resolve_model_path,
    save_config,
)
from mlx_internvl.tokenizer import TOKENIZER_FILES

SHARD_BYTES = 4 << 30


def quantize(model: nn.Module, bits: int, group_size: int, quantize_vision: bool = False) -> dict:
    """Quantize the LLM's linear and embedding layers (and, if asked, the vision tower and projector).

    Returns the `quantization` config entry: defaults plus the per-layer overrides the backbone asks for
    (mlx-lm's `quant_predicate`, e.g. 8-bit MoE routers), in the form the loader reads back.
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


def save_weights(weights: dict, out: Path, metadata: Optional[dict] = None, desc: str = "writing") -> None:
    """Write `weights` as `model-0000k-of-0000n.safetensors` shards of at most `SHARD_BYTES` (+ index).

    Tensors are evaluated one at a time and each shard is released once written, so peak memory is about one
    output shard plus one source tensor, not the model. `weights` is emptied as it goes.
    """
    metadata = {"format": "mlx"} if metadata is None else metadata
    shards, current, size = [], [], 0
    for key in sorted(weights):
        nbytes = weights[key].nbytes
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    if current:
        shards.append(current)
    n = len(shards)
    weight_map, total = {}, 0
    with tqdm(total=sum(len(keys) for keys in shards), desc=desc, unit="tensor", disable=None, leave=False) as bar:
        for i, keys in enumerate(shards):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            shard = {}
            for key in keys:
                arr = weights.pop(key)
                mx.eval(arr)
                shard[key] = arr
                bar.update()
            mx.save_safetensors(str(out / name), shard, metadata=metadata)
            total += sum(v.nbytes for v in shard.values())
            weight_map.update({k: name for k in keys})
            del shard, arr
            mx.clear_cache()
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)


def copy_remote_code(src: Path, dst: Path) -> None:
    """Carry an original checkpoint's `*.py` files along as plain files (never imported here), so that an export
    back to the original layout can be loaded with `trust_remote_code=True` again."""
    for f in sorted(src.glob("*.py")):
        shutil.copyfile(f, dst / f.name)


def convert(
    hf_path: Union[str, Path],
    mlx_path: Union[str, Path],
    dtype: Optional[str] = None,
    quantize_model: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    quantize_vision: bool = False,
    force: bool = False,
    revision: Optional[str] = None,
) -> Path:
    """Convert an original-layout or `-hf` InternVL checkpoint (directory or hub id) into `mlx_path`.

    Every tensor is checked against config.json (names and shapes) before anything is written; the output appears
    only when complete (see `staged_output`).
    """
    out = Path(mlx_path).expanduser()
    if out.exists() and not force:
        raise UserError(f"{out} already exists. Delete it or pass --force to replace it.")
    if q_group_size not in (32, 64, 128):
        raise UserError(f"--q-group-size {q_group_size} is not supported; use 32, 64 or 128")
    check_writable_dir(out)
    src = resolve_model_path(hf_path, revision)
    raw, fmt = read_config(src)
    if fmt == "mlx":
        raise UserError(f"{src} is already an MLX model converted by mlx-internvl; nothing to convert")
    config, weights, source = hf_weights(src, raw, parse_dtype(dtype))
    model = build_model(config)
    load_weights_checked(model, weights, source, str(src / "config.json"))
    del weights
    if quantize_model:
        config.quantization = quantize(model, q_bits, q_group_size, quantize_vision)
    weights = dict(tree_flatten(model.parameters()))
    del model
    with staged_output(out, force) as tmp:
        save_weights(weights, tmp)
        save_config(config, tmp)
        copy_tokenizer_files(src, tmp)
        if fmt == "original":
            copy_remote_code(src, tmp)
    return out

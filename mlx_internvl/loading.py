"""Loading a model: from a converted MLX directory, a Hugging Face directory of either layout, or a hub repo id.

- A converted MLX directory is read as it is (`mlx_internvl.weights.load_mlx_model`).
- A local Hugging Face directory is converted in memory by `mlx_internvl.convert.read_hf`, the same path
  `mlx-internvl convert` writes out; nothing from the checkpoint's remote code (`*.py`) is imported.
- A hub repo id is downloaded once and converted once into a cache (`resolve_model_path`), then read from there;
  the library's `load()` and the CLI share this.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Tuple, Union

import mlx.core as mx

from .adapters import load_adapters
from .convert.convert import convert
from .convert.mlx_vlm import is_mlx_vlm_dir
from .convert.read import read_hf
from .hub import HubUnavailable, conversion_dir, latest_conversion, local_or_download
from .model import InternVLChatModel
from .processing import Processor
from .weights import apply_quantization, build_model, load_mlx_model, load_weights_checked, parse_dtype, read_config

logger = logging.getLogger("mlx_internvl")
PathLike = Union[str, Path]


def resolve_model_path(path_or_repo: PathLike, revision: Optional[str] = None) -> Path:
    """A local directory as it is; for a hub repo id, its MLX conversion in the cache (downloaded and converted the
    first time; offline, the newest conversion already there). Hub errors are `UserError`s that say what to do."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        return local_or_download(p)
    repo = str(path_or_repo)
    try:
        src = local_or_download(repo, revision)
    except HubUnavailable:
        done = latest_conversion(repo)
        if revision is None and done is not None:
            logger.warning("%s: hub unavailable; using the converted copy %s", repo, done)
            return done
        raise
    if read_config(src)[1] == "mlx" or is_mlx_vlm_dir(src):  # ours, or mlx-vlm's (mlx-community): read as is
        return src
    out = conversion_dir(repo, src)
    if not (out / "config.json").exists():
        logger.warning("converting %s to MLX once, into %s", repo, out)
        convert(src, out, force=out.exists())
    return out


def load_model(path_or_repo: PathLike, dtype=None, lazy: bool = False, revision: Optional[str] = None
               ) -> Tuple[InternVLChatModel, Path]:
    """`(model, directory it was read from)` for a converted MLX directory, an HF directory of either layout, or a
    hub repo id. The model's config holds everything it needs (`image_token_id`, `source_path`)."""
    path = resolve_model_path(path_or_repo, revision)
    dtype = parse_dtype(dtype)
    raw, fmt = read_config(path)
    if fmt == "mlx":
        model = load_mlx_model(path, raw, dtype)
        logger.info("%s: read as mlx-internvl's own MLX layout%s", path,
                    f" ({model.config.quantization['bits']}-bit)" if model.config.quantization else "")
    else:
        config, weights, source = read_hf(path, raw, dtype)
        model = build_model(config)
        if config.quantization:  # an mlx-vlm quantized checkpoint
            apply_quantization(model, config.quantization, weights)
        load_weights_checked(model, weights, source, str(path / "config.json"))
    if not lazy:
        mx.eval(model.parameters())
    return model, path


def load(path_or_repo: PathLike, dtype=None, adapter_path: Optional[PathLike] = None, lazy: bool = False,
         revision: Optional[str] = None, template: Optional[str] = None):
    """`model, processor = load(...)`: accepts a converted MLX directory, an HF directory (original OpenGVLab or
    transformers `-hf` layout) or a hub repo id; `adapter_path` applies LoRA adapters, `template` overrides the
    checkpoint's conversation template."""
    model, path = load_model(path_or_repo, dtype=dtype, lazy=True, revision=revision)
    processor = Processor.from_pretrained(path, model.config, template)
    if adapter_path is not None:
        load_adapters(model, adapter_path)
    if not lazy:
        mx.eval(model.parameters())
    return model, processor

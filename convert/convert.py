"""`mlx-internvl convert`: a Hugging Face checkpoint (either layout) to an MLX directory, optionally quantized.

- Nothing is written until every tensor has been mapped and checked against config.json (names and shapes).
- The output is built in a temporary sibling directory and renamed into place only when complete, so a failed or
  interrupted conversion leaves nothing behind (`mlx_internvl.files.staged_output`).
- Tensors are read lazily (`mx.load` reads headers only) and evaluated one at a time while writing, so peak memory
  is about one output shard (`SHARD_BYTES`), not the model: see benchmarks/convert_memory.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from mlx.utils import tree_flatten

from mlx_internvl import model_card, publish
from mlx_internvl.errors import UserError
from mlx_internvl.files import check_new_output
from mlx_internvl.hub import local_or_download
from mlx_internvl.weights import (
    apply_quantization,
    build_model,
    load_weights_checked,
    parse_dtype,
    quantize,
    read_config,
    save_mlx_model,
)

from .read import read_hf


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
    upload_repo: Optional[str] = None,
) -> Path:
    """Convert an original-layout or `-hf` InternVL checkpoint (directory or hub id) into `mlx_path`.

    Every tensor is checked against config.json (names and shapes) before anything is written; the output appears
    only when complete, with a model card (README.md); `upload_repo` then uploads it to the hub. An mlx-vlm
    directory (an mlx-community repo) is a valid source too.
    """
    publish.check_repo_id(upload_repo)
    out = Path(mlx_path).expanduser()
    check_new_output(out, force)
    if q_group_size not in (32, 64, 128):
        raise UserError(f"--q-group-size {q_group_size} is not supported; use 32, 64 or 128")
    src = local_or_download(hf_path, revision)
    raw, fmt = read_config(src)
    if fmt == "mlx":
        raise UserError(f"{src} is already an MLX model converted by mlx-internvl; nothing to convert")
    config, weights, source = read_hf(src, raw, parse_dtype(dtype))
    model = build_model(config)
    if config.quantization:  # an mlx-vlm checkpoint that is already quantized
        if quantize_model:
            raise UserError(f"{src} is already quantized ({config.quantization['bits']}-bit, by mlx-vlm); "
                            "convert it without -q, or quantize the original checkpoint")
        apply_quantization(model, config.quantization, weights)
    load_weights_checked(model, weights, source, str(src / "config.json"))
    del weights
    if quantize_model:
        config.quantization = quantize(model, q_bits, q_group_size, quantize_vision)
    weights = dict(tree_flatten(model.parameters()))
    del model  # from here on each parameter is freed once its shard is written
    card = model_card.for_convert(hf_path, src, out, upload_repo=upload_repo, dtype=dtype,
                                  quantization=config.quantization, quantize_model=quantize_model, q_bits=q_bits,
                                  q_group_size=q_group_size, quantize_vision=quantize_vision)
    save_mlx_model(weights, config, out, src, force, remote_code=fmt == "original", card=card)
    if upload_repo:
        publish.upload(out, upload_repo)
    return out

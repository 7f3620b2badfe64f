"""Merging adapters into the base weights, and writing the result as an MLX model or a Hugging Face checkpoint.

Each `LoRALinear`/`DoRALinear` is replaced by mlx-lm's own `fuse()` result (`W + scale * B^T A^T`, DoRA row
renormalisation included). On a quantized base the fused weight is quantized again with the base's settings
(mlx-lm's behaviour, which rounds the update into the 4/8-bit grid) unless `dequantize=True`, which also turns
every other quantized layer back into a full-precision one. The MLX directory is written under a temporary name
and renamed when complete, like `convert`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import dequantize_model

from .. import model_card, publish
from ..adapters import adapter_modules
from ..convert.export import export_hf as write_hf
from ..errors import UserError
from ..files import check_new_output
from ..loading import load, resolve_model_path
from ..weights import save_mlx_model as write_mlx
from .peft import export_peft as write_peft


def fuse_adapters(model, dequantize: bool = False):
    """Replace every adapter layer of `model` by its merged layer (in place); returns the model."""
    fused = [(name, module.fuse(dequantize=dequantize)) for name, module in adapter_modules(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize and model.config.quantization:
        dequantize_model(model)
        model.config.quantization = None
    model.unfreeze()
    return model


def save_mlx_model(model, source_dir: Path, out: Path, force: bool = False, card: Optional[str] = None) -> Path:
    """Write `model` as a converted MLX directory (weights, config, the source's tokenizer files, the model card
    text `card`), atomically."""
    return write_mlx(dict(tree_flatten(model.parameters())), model.config, out, Path(source_dir), force, card=card)


def fuse(model_path: Union[str, Path], adapter_path: Union[str, Path], out: Optional[Union[str, Path]] = None,
         dequantize: bool = False, export_hf: Optional[str] = None, export_peft: Optional[Union[str, Path]] = None,
         dtype: Optional[str] = None, force: bool = False, upload_repo: Optional[str] = None) -> dict:
    """Fuse `adapter_path` into `model_path` and write `out`: an MLX model directory (loadable with
    `mlx_internvl.load`), or with `export_hf` ('original' | 'hf') a dequantized Hugging Face checkpoint of that
    layout for transformers / LMDeploy / vLLM. `export_peft` also writes the unfused adapters in PEFT format.
    Returns the paths written, by kind ('mlx' | 'hf', 'peft'). The model directory gets a model card, and
    `upload_repo` uploads it (MLX or Hugging Face) to the hub afterwards.
    """
    publish.check_repo_id(upload_repo)
    if upload_repo and out is None:
        raise UserError("--upload-repo uploads the fused model: give --save-path too")
    if out is None and export_peft is None:
        raise UserError("nothing to write: give --out (and --export-hf for a Hugging Face checkpoint) or --export-peft")
    if export_hf not in (None, "original", "hf"):
        raise UserError(f"--export-hf {export_hf!r}: use 'original' (OpenGVLab layout) or 'hf' (transformers)")
    for target in (out, export_peft):
        if target is not None:
            check_new_output(Path(target).expanduser(), force)
    written = {}
    if export_peft is not None:
        written["peft"] = write_peft(adapter_path, export_peft, base_model=str(model_path), force=force)
    if out is None:
        return written
    source = resolve_model_path(model_path)
    model, _ = load(source, dtype=dtype, adapter_path=adapter_path)
    fuse_adapters(model, dequantize=dequantize)
    if export_hf is None:
        card = model_card.for_fuse(model_path, source, adapter_path, Path(out), upload_repo=upload_repo,
                                   dequantize=dequantize, quantization=model.config.quantization)
        written["mlx"] = save_mlx_model(model, source, Path(out), force, card=card)
        if upload_repo:
            publish.upload(written["mlx"], upload_repo)
    else:
        command = model_card.shell_join(["mlx-internvl", "fuse", "--model", model_path, "--adapter-path",
                                         adapter_path, "--save-path", out, "--export-hf", export_hf]
                                        + (["--upload-repo", upload_repo] if upload_repo else []))
        # The model's config keeps `source_path`, so the export takes tokenizer files (and remote code) from there.
        written["hf"] = write_hf(model, out, layout=export_hf, force=force, upload_repo=upload_repo,
                                 card_command=command)
    return written

"""`mlx-internvl convert`: a thin shell over `mlx_internvl.convert.convert`.

Source and destination go as positional arguments or, as mlx_lm.convert and mlx_vlm.convert spell them, as
`--hf-path` / `--mlx-path` (mlx-lm's default output directory `mlx_model` applies when none is given that way).
"""

import click

from mlx_internvl.convert import convert
from mlx_internvl.errors import UserError

from .options import upload_option


@click.command(name="convert")
@click.argument("hf_path_arg", metavar="HF_PATH", required=False)
@click.argument("mlx_path_arg", metavar="MLX_PATH", required=False, type=click.Path())
@click.option("--hf-path", "--model", "hf_path", default=None,
              help="Source: an InternVL directory of either Hugging Face layout, an mlx-vlm directory, or a hub id "
                   "(same as HF_PATH).")
@click.option("--mlx-path", "mlx_path", type=click.Path(), default=None,
              help="Where the MLX model goes (same as MLX_PATH; default with --hf-path: mlx_model).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Weight dtype of the output (default: the checkpoint's own).")
@click.option("-q", "--quantize", is_flag=True, help="Quantize the language model's linear and embedding layers.")
@click.option("--q-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default="4", show_default=True)
@click.option("--q-group-size", type=int, default=64, show_default=True)
@click.option("--quantize-vision", is_flag=True, help="Also quantize the vision tower and projector.")
@click.option("--force", is_flag=True, help="Replace MLX_PATH if it exists.")
@click.option("--revision", default=None, help="Hub revision when HF_PATH is a repo id.")
@upload_option()
def command(hf_path_arg, mlx_path_arg, hf_path, mlx_path, dtype, quantize, q_bits, q_group_size, quantize_vision,
            force, revision, upload_repo):
    """Convert HF_PATH (an InternVL directory of either Hugging Face layout, or a hub repo id) to MLX_PATH, with a
    model card; --upload-repo puts the result on the hub."""
    for name, arg, opt in (("HF_PATH", hf_path_arg, hf_path), ("MLX_PATH", mlx_path_arg, mlx_path)):
        if arg is not None and opt is not None and arg != opt:
            raise UserError(f"{name} given twice ({arg!r} and {opt!r}); give it once, as an argument or an option")
    source = hf_path_arg or hf_path
    if source is None:
        raise UserError("give the model to convert: HF_PATH, or --hf-path")
    target = mlx_path_arg or mlx_path or ("mlx_model" if hf_path else None)
    if target is None:
        raise UserError("give where the MLX model goes: MLX_PATH, or --mlx-path")
    out = convert(source, target, dtype=dtype, quantize_model=quantize, q_bits=int(q_bits),
                  q_group_size=q_group_size, quantize_vision=quantize_vision, force=force, revision=revision,
                  upload_repo=upload_repo)
    click.echo(f"Wrote {out}" + (f" and uploaded it to {upload_repo}" if upload_repo else ""))

"""`mlx-internvl export`: a thin shell over `mlx_internvl.convert.export.export_hf`."""

import click

from mlx_internvl.convert.export import export_hf

from .options import upload_option


@click.command(name="export")
@click.argument("mlx_path", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--layout", type=click.Choice(["original", "hf"]), default="original", show_default=True,
              help="original: OpenGVLab InternVLChatModel (remote code); hf: transformers "
                   "InternVLForConditionalGeneration.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Weight dtype of the output (default: the model's own; quantized layers are dequantized).")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@upload_option()
def command(mlx_path, out_dir, layout, dtype, force, upload_repo):
    """Export MLX_PATH (a directory written by `mlx-internvl convert` or `fuse`) to OUT_DIR as a Hugging Face
    checkpoint that PyTorch/CUDA users can load."""
    out = export_hf(mlx_path, out_dir, layout=layout, dtype=dtype, force=force, upload_repo=upload_repo)
    click.echo(f"Wrote {out} ({layout} layout)" + (f" and uploaded it to {upload_repo}" if upload_repo else ""))

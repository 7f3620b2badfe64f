"""`mlx-internvl convert`: a thin shell over `mlx_internvl.convert.convert`."""

import click

from mlx_internvl.convert import convert


@click.command(name="convert")
@click.argument("hf_path")
@click.argument("mlx_path", type=click.Path())
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Weight dtype of the output (default: the checkpoint's own).")
@click.option("-q", "--quantize", is_flag=True, help="Quantize the language model's linear and embedding layers.")
@click.option("--q-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default="4", show_default=True)
@click.option("--q-group-size", type=int, default=64, show_default=True)
@click.option("--quantize-vision", is_flag=True, help="Also quantize the vision tower and projector.")
@click.option("--force", is_flag=True, help="Replace MLX_PATH if it exists.")
@click.option("--revision", default=None, help="Hub revision when HF_PATH is a repo id.")
def command(hf_path, mlx_path, dtype, quantize, q_bits, q_group_size, quantize_vision, force, revision):
    """Convert HF_PATH (an InternVL directory of either Hugging Face layout, or a hub repo id) to MLX_PATH."""
    out = convert(hf_path, mlx_path, dtype=dtype, quantize_model=quantize, q_bits=int(q_bits),
                  q_group_size=q_group_size, quantize_vision=quantize_vision, force=force, revision=revision)
    click.echo(f"Wrote {out}")

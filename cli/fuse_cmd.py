"""`mlx-internvl fuse`: a thin shell over `mlx_internvl.lora.fuse`."""

import click

from mlx_internvl.lora import fuse


@click.command(name="fuse")
@click.option("--model", "model_path", required=True, help="The base model the adapters were trained on.")
@click.option("--adapter-path", required=True, type=click.Path(), help="Directory written by `mlx-internvl lora`.")
@click.option("--out", type=click.Path(), default=None, help="Where the fused model goes.")
@click.option("--dequantize", is_flag=True, help="Fuse into full-precision weights (a quantized base is dequantized).")
@click.option("--export-hf", type=click.Choice(["original", "hf"]), default=None,
              help="Write --out as a Hugging Face checkpoint of this layout (for transformers, LMDeploy, vLLM) "
                   "instead of an MLX model.")
@click.option("--export-peft", type=click.Path(), default=None,
              help="Also write the (unfused) adapters in PEFT format to this directory.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None)
@click.option("--force", is_flag=True, help="Replace existing output directories.")
def command(model_path, adapter_path, out, dequantize, export_hf, export_peft, dtype, force):
    """Merge LoRA/DoRA adapters into the base model, or export them."""
    written = fuse(model_path, adapter_path, out, dequantize=dequantize, export_hf=export_hf,
                   export_peft=export_peft, dtype=dtype, force=force)
    for kind, path in written.items():
        click.echo(f"Wrote {kind}: {path}")

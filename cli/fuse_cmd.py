"""`mlx-internvl fuse`: a thin shell over `mlx_internvl.lora.fuse`."""

import click

from mlx_internvl.lora import fuse

from .options import adapter_option, upload_option


@click.command(name="fuse")
@click.option("--model", "model_path", required=True, help="The base model the adapters were trained on.")
@adapter_option(required=True, help="Directory written by `mlx-internvl lora`.")
@click.option("--save-path", "--out", "out", type=click.Path(), default=None,
              help="Where the fused model goes (`--out` is an alias).")
@click.option("--dequantize", is_flag=True, help="Fuse into full-precision weights (a quantized base is dequantized).")
@click.option("--export-hf", type=click.Choice(["original", "hf"]), default=None,
              help="Write --out as a Hugging Face checkpoint of this layout (for transformers, LMDeploy, vLLM) "
                   "instead of an MLX model.")
@click.option("--export-peft", type=click.Path(), default=None,
              help="Also write the (unfused) adapters in PEFT format to this directory.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None)
@click.option("--force", is_flag=True, help="Replace existing output directories.")
@upload_option()
def command(model_path, adapter_path, out, dequantize, export_hf, export_peft, dtype, force, upload_repo):
    """Merge LoRA/DoRA adapters into the base model, or export them."""
    written = fuse(model_path, adapter_path, out, dequantize=dequantize, export_hf=export_hf,
                   export_peft=export_peft, dtype=dtype, force=force, upload_repo=upload_repo)
    for kind, path in written.items():
        click.echo(f"Wrote {kind}: {path}")
    if upload_repo:
        click.echo(f"Uploaded to {upload_repo}")

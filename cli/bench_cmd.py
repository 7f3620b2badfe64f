"""`mlx-internvl bench`: full-size presets with random weights, MLX vs the torch reference (no downloads)."""

import click

from mlx_internvl.bench.run import main
from mlx_internvl.errors import UserError
from mlx_internvl.validate import integer

from .options import int_range


def _csv(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@click.command(name="bench")
@click.option("--presets", default=None,
              help="Comma-separated presets (default: all on Metal, internvl2_5-1b on CPU).")
@click.option("--dtypes", default=None,
              help="Comma-separated: float32,bfloat16,4bit (default: all on Metal, float32 on CPU).")
@click.option("--tiles", default="1,13", show_default=True, help="Tile counts for time-to-first-token.")
@click.option("--decode-tokens", type=int_range("max_tokens"), default=128, show_default=True)
@click.option("--no-torch", is_flag=True, help="Skip the torch reference side.")
@click.option("--torch-device", default="cpu", show_default=True,
              help="Device of the torch side (cpu, cuda, mps, npu).")
@click.option("--no-load-time", is_flag=True, help="Skip writing and re-loading the model to time loading.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write all results as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None, help="Write the table.")
def command(presets, dtypes, tiles, decode_tokens, no_torch, torch_device, no_load_time, json_path, markdown_path):
    """Measure vision, time to first token, prefill, decode, memory and load time on full-size architectures."""
    try:
        tile_list = tuple(int(t) for t in tiles.split(",") if t.strip())
    except ValueError:
        raise UserError(f"--tiles {tiles!r}: expected comma-separated whole numbers, e.g. 1,13") from None
    for t in tile_list:
        integer("--tiles", t, minimum=1, maximum=40)
    integer("--decode-tokens", decode_tokens, minimum=1)
    main(_csv(presets), _csv(dtypes), tile_list, decode_tokens, not no_torch, torch_device, not no_load_time,
         json_path, markdown_path, echo=click.echo)

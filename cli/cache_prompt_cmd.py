"""`mlx-internvl cache-prompt`: compute the KV cache of an image/video prompt once and write it to a file.

A thin shell over `mlx_internvl.prompt_cache.save_prompt_cache_file`; `generate --prompt-cache-file` and `chat
--prompt-cache-file` reuse the file for any request that extends the cached prompt.
"""

from __future__ import annotations

import sys
import time

import click

from mlx_internvl.errors import UserError
from mlx_internvl.flash import describe
from mlx_internvl.hub import DEFAULT_MODEL
from mlx_internvl.prompt_cache import save_prompt_cache_file

from .generate_cmd import load_for_cli, setup_logging
from .options import int_range


@click.command(name="cache-prompt")
@click.option("--model", "-m", "model_path", default=DEFAULT_MODEL, show_default=True,
              help="A converted MLX directory, a Hugging Face InternVL directory, or a hub repo id.")
@click.option("--revision", default=None, help="Hub revision when --model is a repo id.")
@click.option("--adapter", "adapter_path", default=None, type=click.Path(), help="LoRA adapter directory to apply.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Compute dtype (default: the checkpoint's); requests must use the same.")
@click.option("--template", default=None, help="Conversation template (default: the checkpoint's).")
@click.option("--system", "system_message", default=None, help="System message (default: the template's).")
@click.option("--image", "-i", "images", multiple=True, help="Image path or URL; repeat for several images.")
@click.option("--video", default=None, type=click.Path(), help="A local video file (needs the [video] extra).")
@click.option("--num-frames", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option("--max-tiles", type=click.IntRange(1, 40), default=None, help="Most 448px tiles per image.")
@click.option("--exif-transpose", is_flag=True, help="Rotate photos by their EXIF orientation.")
@click.option("--prompt", "-p", default="", show_default=True,
              help="The opening of the question to cache ('-' reads stdin); later questions must start with it. "
                   "Default: nothing, so any question about the same images reuses the file.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="The .safetensors file to write (atomically).")
@click.option("--prefill-step-size", type=int_range("prefill_step_size"), default=2048, show_default=True)
@click.option("--flash/--no-flash", "flash", default=None,
              help="InternVL3.5-Flash checkpoints: cache the prompt as the resolution router shortens it, or at full "
                   "resolution; requests must use the file in the same mode. Default: the config's flash_mode.")
@click.option("--verbose", "-v", is_flag=True)
def command(model_path, revision, adapter_path, dtype, template, system_message, images, video, num_frames,
            max_tiles, exif_transpose, prompt, out, prefill_step_size, flash, verbose):
    """Cache the KV state of an image/video prompt in a file, for later requests that extend it."""
    setup_logging(verbose)
    if prompt == "-":
        prompt = sys.stdin.read()
    if not images and video is None and not prompt:
        raise UserError("nothing to cache: give --image/--video and/or --prompt")
    model, processor = load_for_cli(model_path, revision, adapter_path, dtype, template)
    t = time.perf_counter()
    pcf = save_prompt_cache_file(model, processor, out, prompt, list(images), video=video, num_frames=num_frames,
                                 max_tiles=max_tiles, system_message=system_message, exif_transpose=exif_transpose,
                                 prefill_step_size=prefill_step_size, flash=flash)
    n_img = sum(pcf.num_tiles)
    if pcf.router and verbose:
        click.echo(describe(pcf.router["compress"], pcf.router["p0"]), err=True)
    click.echo(f"Cached {len(pcf.token_ids)} tokens ({n_img} tiles) in {time.perf_counter() - t:.1f} s -> {out}",
               err=True)

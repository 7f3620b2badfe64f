"""`mlx-internvl parity`: thin shells over `mlx_internvl.parity`.

    mlx-internvl parity MODEL --image IMG --prompt TEXT          both sides here (torch on --device)
    mlx-internvl parity dump MODEL --image IMG --out stages.npz  torch half (e.g. on a CUDA or NPU box)
    mlx-internvl parity compare MODEL stages.npz                 MLX half (e.g. on a Mac), inputs from the file

`parity` is a group whose first argument, when it is not `dump` or `compare`, is taken as MODEL of the one-shot run.
"""

import click

from mlx_internvl.parity import compare_dump, dump_reference, format_report, run_parity, write_json

from .options import int_range

REF_OPTIONS = [
    click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False),
                 help="An image (repeat for several; the prompt gets one <image> per image unless it has them)."),
    click.option("--prompt", default="Describe the image.", show_default=True),
    click.option("--device", type=click.Choice(["cpu", "cuda", "mps", "npu"]), default=None,
                 help="torch device for the reference (default: the first available of cuda, mps, npu, cpu)."),
    click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
                 show_default=True, help="Weights and compute dtype of both sides."),
    click.option("--max-tiles", type=click.IntRange(1, 40), default=None,
                 help="Tiles per image (default: the checkpoint's)."),
    click.option("--tokens", type=int_range("max_tokens"), default=16, show_default=True,
                 help="Greedy steps to compare."),
    click.option("--trust-remote-code", is_flag=True, default=False,
                 help="InternVL3.5-Flash: run the checkpoint's own modeling_internvl_chat.py, the torch reference "
                      "of its router (read that code first)."),
]


def ref_options(f):
    for option in reversed(REF_OPTIONS):
        f = option(f)
    return f


def _emit(report, json_path):
    click.echo(format_report(report))
    if json_path:
        write_json(report, json_path)
        click.echo(f"\nwrote {json_path}")


class ParityGroup(click.Group):
    """Routes `parity MODEL ...` to the hidden `run` subcommand, so the subcommands and the one-shot form coexist."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run"] + list(args)
        return super().parse_args(ctx, args)


@click.group(name="parity", cls=ParityGroup)
def command():
    """Compare the MLX model with transformers' InternVL stage by stage: per-stage max-abs and relative error,
    and greedy-token agreement. An InternVL3.5-Flash checkpoint adds its router's stages, whose torch reference is
    the checkpoint's own remote code (--trust-remote-code).

    \b
    mlx-internvl parity MODEL --image IMG --prompt TEXT [--json out.json]
    mlx-internvl parity dump MODEL --image IMG --prompt TEXT --out stages.npz
    mlx-internvl parity compare MODEL stages.npz [--json out.json]

    MODEL is a Hugging Face directory (original or -hf layout; the MLX side converts it in memory) or a hub id;
    for `compare` it may also be a converted MLX directory.
    """


@command.command(name="run", hidden=True)
@click.argument("model")
@ref_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the report here.")
def run(model, images, prompt, device, dtype, max_tiles, tokens, trust_remote_code, json_path):
    """Both sides in this process."""
    report = run_parity(model, images, prompt, device=device, dtype=dtype, max_tiles=max_tiles, tokens=tokens,
                        trust_remote_code=trust_remote_code)
    _emit(report, json_path)


@command.command(name="dump")
@click.argument("model")
@ref_options
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True,
              help="Where to write the inputs and reference stages (.npz).")
def dump(model, images, prompt, device, dtype, max_tiles, tokens, trust_remote_code, out):
    """The torch half: run the reference and save its stages and the processor inputs."""
    path = dump_reference(model, out, images, prompt, device=device, dtype=dtype, max_tiles=max_tiles,
                          tokens=tokens, trust_remote_code=trust_remote_code)
    click.echo(f"wrote {path}")


@command.command(name="compare")
@click.argument("model")
@click.argument("stages", type=click.Path(dir_okay=False))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="MLX dtype (default: the one the reference ran in).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the report here.")
def compare(model, stages, dtype, json_path):
    """The MLX half: run MODEL on the inputs stored in STAGES and compare with the reference stages there."""
    _emit(compare_dump(model, stages, dtype=dtype), json_path)

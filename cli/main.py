"""`mlx-internvl`: one click group; each subcommand lives in its own module and is a thin shell over a library call.

Expected errors (`UserError`: bad paths, keys, arguments) print as one line on stderr and exit with status 1,
without a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from mlx_internvl.errors import UserError

# subcommand name -> module under mlx_internvl.cli that defines a click command called `command`.
SUBCOMMANDS = {
    "convert": "convert_cmd",
    "export": "export_cmd",
    "parity": "parity_cmd",
    "generate": "generate_cmd",
    "chat": "chat_cmd",
    "cache-prompt": "cache_prompt_cmd",
    "lora": "lora_cmd",
    "fuse": "fuse_cmd",
    "bench": "bench_cmd",
    "serve": "serve_cmd",
    "cache": "cache_cmd",
    "eval": "eval_cmd",
}


class LazyGroup(click.Group):
    """Imports a subcommand's module only when it runs, so `--help` and quick commands stay fast."""

    def list_commands(self, ctx):
        return [name for name, mod in SUBCOMMANDS.items() if importlib.util.find_spec(f"mlx_internvl.cli.{mod}")]

    def get_command(self, ctx, name):
        mod = SUBCOMMANDS.get(name)
        if mod is None or importlib.util.find_spec(f"mlx_internvl.cli.{mod}") is None:
            return None
        return importlib.import_module(f"mlx_internvl.cli.{mod}").command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-internvl")
def cli():
    """InternVL vision-language models in MLX: convert, generate, chat, fine-tune, check parity."""


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="mlx-internvl", standalone_mode=False)
    except UserError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

"""Option spellings shared by the subcommands, so mlx-lm / mlx-vlm users can type what they already type.

- `GreedyOption` + `Command`: an option that takes several values after one flag (`--image a.png b.png`, as
  argparse's `nargs="+"` in mlx-lm and mlx-vlm) and may still be repeated (`--image a.png --image b.png`).
- `adapter_option`: `--adapter-path` everywhere, `--adapter` kept as an alias.
- `max_tokens_option`: `--max-tokens`/`-m`, which is what `-m` means in mlx_lm.generate and mlx_lm.chat.
- `upload_option`: `--upload-repo`, as in mlx_lm.convert / mlx_lm.fuse / mlx_vlm.convert.
"""

from __future__ import annotations

import json
from typing import List, Optional

import click

from mlx_internvl.errors import UserError
from mlx_internvl.sampling import INT_RANGES, parse_token_id


class GreedyOption(click.Option):
    """A `multiple=True` option whose flag also takes the values that follow it, up to the next option."""

    def __init__(self, *args, **kwargs):
        kwargs["multiple"] = True
        super().__init__(*args, **kwargs)


class Command(click.Command):
    """A click command that rewrites `--opt A B C` into `--opt A --opt B --opt C` for its `GreedyOption`s."""

    def parse_args(self, ctx, args: List[str]) -> List[str]:
        greedy = {name for p in self.params if isinstance(p, GreedyOption) for name in p.opts}
        out, i = [], 0
        while i < len(args):
            arg = args[i]
            out.append(arg)
            i += 1
            if arg == "--":
                out += args[i:]
                break
            if arg in greedy and i < len(args):
                out.append(args[i])  # the first value, whatever it looks like
                i += 1
                while i < len(args) and not args[i].startswith("-"):
                    out += [arg, args[i]]
                    i += 1
            elif "=" in arg and arg.split("=", 1)[0] in greedy:
                while i < len(args) and not args[i].startswith("-"):
                    out += [arg.split("=", 1)[0], args[i]]
                    i += 1
        return super().parse_args(ctx, out)


def int_range(name: str) -> click.IntRange:
    """The range `sampling.INT_RANGES` states for `name`, as a click type (checked before anything loads)."""
    return click.IntRange(*INT_RANGES[name])


def adapter_option(required: bool = False, help: str = "LoRA adapter directory (written by `mlx-internvl lora`)."):
    return click.option("--adapter-path", "--adapter", "adapter_path", type=click.Path(), default=None,
                        required=required, help=help + " `--adapter` is an alias.")


class _MaxTokens(click.ParamType):
    name = "integer"

    def convert(self, value, param, ctx):
        try:
            number = value if isinstance(value, int) else int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of tokens. -m is --max-tokens, as in mlx-lm; give the model "
                      "with --model", param, ctx)
        return int_range("max_tokens").convert(number, param, ctx)


def max_tokens_option(default: int = 256):
    return click.option("--max-tokens", "-m", type=_MaxTokens(), default=default, show_default=True,
                        help="Most tokens to generate (`-m` as in mlx-lm).")


def upload_option():
    return click.option("--upload-repo", default=None, metavar="OWNER/NAME",
                        help="After writing, upload the directory to this Hugging Face repo (created if needed; "
                             "uses your hub login).")


def parse_logit_bias(ctx, param, value) -> Optional[dict]:
    """`--logit-bias '{"42": -100, "7": 2.5}'` (JSON, as mlx-lm's server takes it) or `42:-100,7:2.5`."""
    if not value:
        return None
    text = value.strip()
    try:
        if text.startswith("{"):
            raw = json.loads(text)
            items = raw.items()
        else:
            items = [part.split(":", 1) for part in text.split(",") if part.strip()]
        bias = {parse_token_id(str(k).strip()): float(v) for k, v in items}
    except (ValueError, TypeError, RecursionError, UserError):
        raise click.BadParameter(f"{value!r}: give token ids and additive biases as JSON ('{{\"42\": -100}}') "
                                 "or as 42:-100,7:2.5") from None
    return bias


def thinking_options(f):
    """`--thinking/--no-thinking` and `--thinking-budget` (generate, chat, serve): see `mlx_internvl.thinking`."""
    f = click.option("--thinking-budget", type=click.IntRange(0), default=None,
                     help="At most this many reasoning tokens, then </think> is forced and the answer follows.")(f)
    return click.option("--thinking/--no-thinking", default=None,
                        help="InternVL3.5 thinking mode: on uses the model card's thinking system prompt and "
                             "temperature 0.6 (unless --temperature is given); off starts the reply with an empty "
                             "think block. Default: neither (the checkpoint's own prompt).")(f)

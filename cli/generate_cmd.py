"""`mlx-internvl generate`: one prompt with images or a video, the reply streamed to stdout.

A thin shell over `mlx_internvl.generate.stream_generate`. `--verbose` writes the prompt (image tokens collapsed
back to `<image>`, as upstream's verbose `chat()` prints it), the tiles and the speed/memory figures to stderr,
so stdout carries only the reply. `model_options` and `sampling_options` are shared with `chat`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys

import click

from mlx_internvl import distributed, sharding
from mlx_internvl.errors import UserError
from mlx_internvl.generate import format_stats, stream_generate
from mlx_internvl.hub import DEFAULT_MODEL
from mlx_internvl.loading import load
from mlx_internvl.prompt_cache import PromptCacheFile
from mlx_internvl.sampling import KVOptions, SamplingOptions
from mlx_internvl.speculative import load_draft
from mlx_internvl.structured import ResponseFormat, load_schema_file
from mlx_internvl.thinking import THINKING_TEMPERATURE
from mlx_internvl.validate import integer

from .options import (
    Command,
    GreedyOption,
    adapter_option,
    int_range,
    max_tokens_option,
    parse_logit_bias,
    thinking_options,
)

_IMAGE_BLOCK = re.compile(r"<img>(?:<IMG_CONTEXT>)+</img>")


def _apply(f, options):
    for option in reversed(options):
        f = option(f)
    return f


def model_options(f):
    """Which model, how to prompt it, how to tile. Spelled as in mlx-lm where mlx-lm has the option
    (`--adapter-path`, `-m/--max-tokens`, `--system-prompt`)."""
    return _apply(f, [
        click.option("--model", "model_path", default=DEFAULT_MODEL, show_default=True,
                     help="A converted MLX directory (ours or mlx-vlm's, e.g. an mlx-community repo), a Hugging Face "
                          "InternVL directory, or a hub repo id (downloaded and converted once, then cached)."),
        click.option("--revision", default=None,
                     help="Hub revision (branch, tag or commit) when --model is a repo id."),
        adapter_option(),
        click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
                     help="Compute dtype (default: the checkpoint's)."),
        click.option("--template", default=None,
                     help="Conversation template (default: the checkpoint's): internvl2_5, Hermes-2, "
                          "internlm2-chat, phi3-chat."),
        click.option("--system", "--system-prompt", "system_message", default=None,
                     help="System message (default: the template's, as upstream)."),
        max_tokens_option(),
        click.option("--max-tiles", type=click.IntRange(1, 40), default=None,
                     help="Most 448px tiles per image, thumbnail not counted (default: the config's, 12)."),
        click.option("--num-frames", type=click.IntRange(1, 256), default=8, show_default=True,
                     help="Frames sampled from a video, one tile each."),
        click.option("--exif-transpose", is_flag=True,
                     help="Rotate photos by their EXIF orientation (upstream does not, so off by default)."),
        click.option("--stop-on-eos", is_flag=True,
                     help="Also stop on the tokenizer's eos token (upstream chat() stops only on the template's end "
                          "token, so this is off by default)."),
        click.option("--flash/--no-flash", "flash", default=None,
                     help="InternVL3.5-Flash checkpoints: run the resolution router (compress simple tiles to 64 "
                          "tokens) or every tile at full resolution (upstream's generate_normal). Default: the "
                          "config's flash_mode."),
        click.option("--verbose", "-v", is_flag=True,
                     help="Show the layout read, prompt, tiles, the Flash router's decisions and speed on stderr."),
    ])


def sampling_options(f):
    """How to sample (`SamplingOptions`) and how to keep the KV cache (`KVOptions`); unset means the default."""
    return _apply(f, [
        click.option("--temperature", "--temp", type=float, default=None,
                     help="Sampling temperature; 0 (the default) is greedy, the model cards' setting."),
        click.option("--top-p", type=float, default=None, help="Nucleus sampling mass (default 1: off)."),
        click.option("--top-k", type=int_range("top_k"), default=None,
                     help="Keep the k likeliest tokens (default 0: off)."),
        click.option("--min-p", type=float, default=None, help="Minimum probability relative to the top token."),
        click.option("--repetition-penalty", type=float, default=None),
        click.option("--presence-penalty", type=float, default=None),
        click.option("--frequency-penalty", type=float, default=None),
        click.option("--logit-bias", callback=parse_logit_bias, default=None,
                     help="Additive biases by token id: JSON '{\"42\": -100}' or 42:-100,7:2.5."),
        click.option("--xtc-probability", type=float, default=None, help="XTC sampling probability (0: off)."),
        click.option("--xtc-threshold", type=float, default=None),
        click.option("--seed", type=int_range("seed"), default=None, help="Random seed for sampling."),
        click.option("--kv-bits", type=click.Choice(["2", "3", "4", "6", "8"]), default=None,
                     callback=lambda ctx, param, v: None if v is None else int(v),
                     help="Quantize the KV cache (saves memory on long video prompts)."),
        click.option("--max-kv-size", type=int_range("max_kv_size"), default=None,
                     help="Rotating KV cache of this many tokens (long chats; may evict image tokens)."),
        click.option("--prefill-step-size", type=int_range("prefill_step_size"), default=None,
                     help="Prompt tokens per prefill chunk (default 2048; smaller lowers peak memory)."),
    ])


def draft_options(f):
    """Speculative decoding and a prompt-cache file (`generate` and `chat`)."""
    return _apply(f, [
        click.option("--draft-model", default=None,
                     help="A smaller InternVL with the same tokenizer (directory or hub id) for speculative decoding, "
                          "e.g. InternVL3-1B for InternVL3-8B."),
        click.option("--draft-quantize", type=click.Choice(["4", "8"]), default=None,
                     callback=lambda ctx, param, v: None if v is None else int(v),
                     help="Speculative decoding with the model's own language model quantized to 4 or 8 bits as the "
                          "draft (no second download)."),
        click.option("--num-draft-tokens", type=click.IntRange(1, 64), default=3, show_default=True,
                     help="Tokens the draft proposes per pass of the model."),
        click.option("--prompt-cache-file", type=click.Path(dir_okay=False), default=None,
                     help="A file from `mlx-internvl cache-prompt`: start from its cached prompt (the request must "
                          "extend it: same images, question starting with the cached text)."),
    ])


def load_extras(model, processor, dtype, options: dict, group=None) -> dict:
    """`{"draft": Draft or None, "prompt_cache_file": PromptCacheFile or None}` from the `draft_options` values in
    `options` (keywords for `stream_generate` and `ChatSession`)."""
    draft_model, bits, cache_file = (options.get(k) for k in ("draft_model", "draft_quantize", "prompt_cache_file"))
    if group is not None and (draft_model or bits or cache_file):
        raise UserError("--draft-model, --draft-quantize and --prompt-cache-file run in one process; they are not "
                        "available under mlx.launch")
    draft = load_draft(model, processor, draft_model, bits, options.get("num_draft_tokens", 3), dtype=dtype)
    return {"draft": draft, "prompt_cache_file": PromptCacheFile.load(cache_file, model) if cache_file else None}


def stats_text(last, draft=None) -> str:
    """The speed/memory lines of a reply, and the draft's line when decoding speculatively."""
    return format_stats(last) + ("" if draft is None else "\n" + draft.stats.summary())


def option_values(options: dict):
    """`(SamplingOptions, KVOptions)` from the command's `sampling_options` (unset ones keep their defaults)."""
    def value(cls):
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: options[k] for k in names if options.get(k) is not None})

    return value(SamplingOptions), value(KVOptions)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the message, not the stream of the first call (commands
    run in-process, e.g. under a test runner or a notebook, may swap stderr between calls)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(verbose: bool) -> None:
    """mlx-internvl's own notes (conversion, EXIF, 16-bit images) on stderr; other libraries keep their levels."""
    logger = logging.getLogger("mlx_internvl")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


def load_for_cli(model_path, revision, adapter_path, dtype, template, group=None):
    """(model, processor) for a CLI command: hub ids come from the converted cache. With a `group` (launched by
    mlx.launch), the language model is split across its ranks."""
    if group is not None:
        return sharding.load(group, model_path, dtype=dtype, adapter_path=adapter_path, revision=revision,
                             template=template)
    return load(model_path, dtype=dtype, adapter_path=adapter_path, revision=revision, template=template)


def printable_prompt(prompt: str) -> str:
    return _IMAGE_BLOCK.sub("<image>", prompt)


def default_prompt(prompt, images, video) -> str:
    if prompt == "-":
        return sys.stdin.read()
    if prompt is not None:
        return prompt
    if video:
        return "Describe this video in detail."
    if images:
        return "Describe this image in detail."
    raise UserError("give a --prompt (and --image/--video to ask about pictures)")


@click.command(name="generate", cls=Command)
@model_options
@sampling_options
@thinking_options
@click.option("--image", "-i", "images", cls=GreedyOption,
              help="Image path(s) or URL(s): --image a.jpg b.jpg, or --image repeated.")
@click.option("--video", default=None, type=click.Path(), help="A local video file (needs the [video] extra).")
@click.option("--prompt", "-p", default=None,
              help="The question; '-' reads it from stdin. Default: a request to describe the image or video.")
@click.option("--json-schema", "json_schema", type=click.Path(dir_okay=False), default=None,
              help="A JSON Schema file: the reply is a JSON object that matches it, constrained token by token.")
@click.option("--json-object", is_flag=True, help="The reply is a JSON object (any), constrained token by token.")
@draft_options
def command(model_path, revision, adapter_path, dtype, template, system_message, max_tokens, max_tiles, num_frames,
            exif_transpose, stop_on_eos, verbose, thinking, thinking_budget, images, video, prompt, json_schema,
            json_object, **options):
    """Answer one prompt about images or a video, streaming the reply."""
    setup_logging(verbose)
    if thinking and options.get("temperature") is None:
        options["temperature"] = THINKING_TEMPERATURE
    sampling, kv = option_values(options)
    integer("max_tokens", max_tokens, minimum=1)
    if json_schema and json_object:
        raise UserError("give --json-schema or --json-object, not both")
    fmt = load_schema_file(json_schema) if json_schema else (ResponseFormat() if json_object else None)
    group = distributed.start()  # None unless launched as a group (mlx.launch); then rank 0 reads and prints
    run = (lambda fn: fn()) if group is None else group.on_leader
    prompt = run(lambda: default_prompt(prompt, images, video))
    model, processor = load_for_cli(model_path, revision, adapter_path, dtype, template, group)
    inputs = run(lambda: processor(prompt, images=list(images), max_tiles=max_tiles, system_message=system_message,
                                   video=video, num_frames=num_frames, exif_transpose=exif_transpose,
                                   thinking=thinking, routed=model.use_flash(options.get("flash"))))
    extras = load_extras(model, processor, dtype, options, group)
    if verbose:
        click.echo(f"Template: {processor.template.name}", err=True)
        if inputs["num_tiles"]:
            click.echo(f"Tiles per image/frame: {inputs['num_tiles']} ({sum(inputs['num_tiles'])} in all)", err=True)
        click.echo("Prompt:\n" + printable_prompt(inputs["prompt"]) + "\n" + "=" * 10, err=True)
    last = None
    for last in stream_generate(model, processor, prompt, inputs=inputs, max_tokens=max_tokens, sampling=sampling,
                                kv=kv, stop_on_eos=stop_on_eos, thinking_budget=thinking_budget,
                                response_format=fmt, flash=options.get("flash"), **extras):
        if verbose and last.router and last.generation_tokens <= 1:
            click.echo(last.router, err=True)
        click.echo(last.text, nl=False)
        sys.stdout.flush()
    click.echo()
    if fmt is not None and last is not None and last.finish_reason == "length":
        click.echo(f"note: the reply reached --max-tokens ({max_tokens}) before its JSON was complete; it is "
                   "cut off. Raise -m/--max-tokens.", err=True)
    if verbose and last is not None:
        click.echo("=" * 10 + "\n" + stats_text(last, extras["draft"]), err=True)
    if group is not None:
        group.close()

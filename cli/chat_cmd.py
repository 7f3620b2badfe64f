"""`mlx-internvl chat`: an interactive multi-turn conversation on stdin/stdout.

Lines are questions; commands start with `/`: `/image PATH [PATH...]` and `/video PATH` attach media to the next
question, `/clear` forgets the conversation, `/history` shows it, `/exit` (or end of input) quits. On a terminal,
lines can be edited and earlier ones recalled (readline, see `repl.py`). A thin shell over
`mlx_internvl.chat.ChatSession`; a bad image or an over-long prompt prints one error line and the chat goes on.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click
import numpy as np
from PIL import Image

from mlx_internvl import distributed
from mlx_internvl.chat import ChatSession
from mlx_internvl.errors import UserError
from mlx_internvl.thinking import THINKING_TEMPERATURE
from mlx_internvl.video import load_video_frames

from .generate_cmd import (
    draft_options,
    load_extras,
    load_for_cli,
    model_options,
    option_values,
    sampling_options,
    setup_logging,
    stats_text,
)
from .options import Command, GreedyOption, thinking_options
from .repl import LineReader

HELP = ("Commands: /image PATH [PATH...] (attach to the next question), /video PATH, /clear (new conversation), "
        "/history, /help, /exit")


@click.command(name="chat", cls=Command)
@model_options
@sampling_options
@thinking_options
@click.option("--image", "-i", "images", cls=GreedyOption,
              help="Image(s) to attach to the first question: --image a.jpg b.jpg, or --image repeated.")
@draft_options
def command(model_path, revision, adapter_path, dtype, template, system_message, max_tokens, max_tiles, num_frames,
            exif_transpose, stop_on_eos, verbose, thinking, thinking_budget, images, **options):
    """Chat with a model about images, turn by turn (line editing and history on a terminal)."""
    setup_logging(verbose)
    if thinking and options.get("temperature") is None:
        options["temperature"] = THINKING_TEMPERATURE
    sampling, kv = option_values(options)
    group = distributed.start()  # None unless launched as a group; then rank 0 reads stdin and shares each line
    model, processor = load_for_cli(model_path, revision, adapter_path, dtype, template, group)
    session = ChatSession(model, processor, system_message=system_message, max_tiles=max_tiles, max_tokens=max_tokens,
                          sampling=sampling, kv=kv, num_frames=num_frames, exif_transpose=exif_transpose,
                          **load_extras(model, processor, dtype, options, group),
                          stop_on_eos=stop_on_eos, thinking=thinking, thinking_budget=thinking_budget,
                          flash=options.get("flash"))
    media = {"images": list(images), "video": None}  # attached to the next question
    click.echo(f"Chatting with {model_path} (template {processor.template.name}). {HELP}", err=True)
    reader = LineReader()
    try:
        while True:
            line = reader.read(">> ") if group is None else group.on_leader(reader.read, ">> ")
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if _slash_command(line, session, media):
                    break
                continue
            _answer(line, session, media, group, num_frames, verbose)
    finally:
        reader.close()
        if group is not None:
            group.close()


def _slash_command(line: str, session, media: dict) -> bool:
    """Run one `/command`; True when the chat should end."""
    cmd, *args = split_command(line) or ["/help"]
    if cmd in ("/exit", "/quit"):
        return True
    if cmd == "/clear":
        session.clear()
        media.update(images=[], video=None)
        click.echo("[conversation cleared]", err=True)
    elif cmd == "/image" and args:
        media["images"] += args
        click.echo(f"[{len(media['images'])} image(s) attached to the next question]", err=True)
    elif cmd == "/video" and len(args) == 1:
        media["video"] = args[0]
        click.echo("[video attached to the next question]", err=True)
    elif cmd == "/history":
        for q, a in session.history:
            click.echo(f"User: {q}\nAssistant: {a}", err=True)
    else:
        click.echo(HELP, err=True)
    return False


def _answer(line: str, session, media: dict, group, num_frames: int, verbose: bool) -> None:
    """Stream the reply to `line` with the attached media; a bad file or prompt is one error line."""
    pending, video = media["images"], media["video"]
    media.update(images=[], video=None)
    last = None
    try:
        if group is not None:  # the files are on rank 0's machine: it reads them for everyone
            pending, video = group.on_leader(read_media, pending, video, num_frames)
            video = None if video is None else [Image.fromarray(f) for f in video]
        for last in session.stream(line, images=pending, video=video):
            click.echo(last.text, nl=False)
            sys.stdout.flush()
    except UserError as e:
        click.echo(f"Error: {e}", err=True)
        return
    click.echo()
    if verbose and session.router:
        click.echo(session.router, err=True)
    if verbose and last is not None:
        click.echo(stats_text(last, session.draft), err=True)


def split_command(line: str):
    """The words of a `/command` line; None (after saying why) when it cannot be split, e.g. an unbalanced quote,
    so the conversation goes on."""
    try:
        return shlex.split(line)
    except ValueError as e:
        click.echo(f"Error: cannot read the command ({e}); quote paths with spaces as \"a b.jpg\"", err=True)
        return None


def read_media(images, video, num_frames: int):
    """Image files as bytes and a video as decoded frames (uint8 arrays: what the group can send), read here (on
    rank 0) so the other ranks need no copy of the files; URLs stay URLs (each rank fetches them)."""
    out = []
    for im in images:
        if str(im).startswith(("http://", "https://")):
            out.append(im)
        else:
            p = Path(im).expanduser()
            if not p.is_file():
                raise UserError(f"{p}: no such image file")
            out.append(p.read_bytes())
    if video is not None:
        video = [np.asarray(f.convert("RGB")) for f in load_video_frames(video, num_frames)]
    return out, video

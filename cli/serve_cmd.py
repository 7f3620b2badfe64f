"""`mlx-internvl serve`: the OpenAI-compatible server and its web chat page; a thin shell over
`mlx_internvl.server.serve`."""

from __future__ import annotations

import logging

import click

from mlx_internvl import distributed
from mlx_internvl.errors import UserError
from mlx_internvl.sampling import COUNT_MAX

from .generate_cmd import DEFAULT_MODEL, setup_logging
from .options import int_range, thinking_options

try:
    from mlx_internvl.server import serve
except ImportError as e:  # FastAPI, uvicorn and prometheus-client are the optional [server] extra
    serve, MISSING = None, e


@click.command(name="serve")
@click.option("--model", "model_path", default=DEFAULT_MODEL, show_default=True,
              help="A converted MLX directory, a Hugging Face InternVL directory, or a hub repo id.")
@click.option("--revision", default=None, help="Hub revision when --model is a repo id.")
@click.option("--adapter-path", "--adapter", "adapter_path", default=None, type=click.Path(),
              help="LoRA adapter directory to apply.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Compute dtype (default: the checkpoint's).")
@click.option("--template", default=None, help="Conversation template (default: the checkpoint's).")
@click.option("--model-name", default=None, help="The model id clients send (default: the --model argument).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on; 0.0.0.0 exposes the server to the network (set --api-key then).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="MLX_INTERNVL_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 routes (or set MLX_INTERNVL_API_KEY).")
@click.option("--allowed-origins", multiple=True,
              help="Browser origins allowed to call the API from other pages (CORS), e.g. http://localhost:3000; "
                   "repeat for several. Other origins are refused (403), the server's own page always works.")
@click.option("--allow-remote-images", is_flag=True,
              help="Let requests name http(s) image URLs, which the server then downloads: public addresses only, "
                   "redirects re-checked, size-capped (--max-image-mb), 10 s for the whole download.")
@click.option("--allow-local-images", "allow_local_images", default=None, type=click.Path(file_okay=False),
              help="Let requests name image files under this directory (nothing outside it).")
@click.option("--allow-private-image-hosts", is_flag=True,
              help="With --allow-remote-images: also fetch from loopback, private and link-local addresses (by "
                   "default only public addresses are fetched; redirects to another host must stay public).")
@click.option("--max-tiles", type=click.IntRange(1, 40), default=None,
              help="Default most 448px tiles per image (requests may set max_tiles).")
@click.option("--num-frames", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Default frames sampled from a video part (requests may set num_frames).")
@click.option("--max-images", type=click.IntRange(1, COUNT_MAX), default=16, show_default=True,
              help="Most images in one request (400 beyond, before any is fetched).")
@click.option("--max-frames", type=click.IntRange(1, COUNT_MAX), default=64, show_default=True,
              help="Most video frames in one request, all its videos together.")
@click.option("--max-request-tiles", type=click.IntRange(1, COUNT_MAX), default=128, show_default=True,
              help="Most 448px tiles in one request, images' tiles and video frames together (counted from headers).")
@click.option("--max-text-kb", type=click.FloatRange(0.001, 1 << 20), default=1024.0, show_default=True,
              help="Most text in one request, all messages together, in KB of UTF-8 (413 beyond, before tokenizing).")
@click.option("--max-video-megapixels", type=click.FloatRange(0.001, 1e9), default=4000.0, show_default=True,
              help="Most pixels decoded from a request's videos: frames read (up to the last sampled) x frame size.")
@click.option("--max-tokens", type=int_range("max_tokens"), default=1024, show_default=True,
              help="Reply length when a request does not set max_tokens.")
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.0, show_default=True,
              help="Temperature when a request does not set one (0: greedy, as the model cards).")
@click.option("--max-request-mb", type=click.FloatRange(0.01, 1 << 20), default=50.0, show_default=True,
              help="Largest request body accepted (413 beyond).")
@click.option("--max-image-mb", type=click.FloatRange(0.01, 1 << 20), default=20.0, show_default=True,
              help="Largest single image or video accepted.")
@click.option("--vision-cache-size", type=click.IntRange(0, COUNT_MAX), default=32, show_default=True,
              help="Images whose encoded features are kept (LRU, keyed by content hash).")
@click.option("--prompt-cache-size", type=click.IntRange(0, COUNT_MAX), default=16, show_default=True,
              help="Conversations whose KV caches are kept for their next turn (LRU, by token prefix).")
@click.option("--vision-cache-bytes", metavar="SIZE", default=None,
              help="Most bytes of image features kept, e.g. 2G or 500MB (default: 1/32 of this machine's memory).")
@click.option("--prompt-cache-bytes", metavar="SIZE", default=None,
              help="Most bytes of conversations' KV caches kept, running requests' included, e.g. 8G (default: 1/4 "
                   "of this machine's memory).")
@click.option("--response-store-size", type=click.IntRange(0, COUNT_MAX), default=256, show_default=True,
              help="Responses API replies kept for previous_response_id and GET /v1/responses/ID (oldest out first).")
@click.option("--response-store-bytes", metavar="SIZE", default="256MB", show_default=True,
              help="Most bytes those kept responses take, their conversations (images' data URLs included) counted "
                   "as JSON.")
@click.option("--decode-concurrency", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Requests decoded together in one batch.")
@click.option("--max-queue", type=click.IntRange(0, COUNT_MAX), default=32, show_default=True,
              help="Requests that may wait for a slot; beyond that the server answers 503 at once.")
@click.option("--shutdown-timeout", "shutdown_timeout_s", type=click.FloatRange(0, 600), default=3.0,
              show_default=True,
              help="Seconds running replies may go on after SIGTERM or Ctrl-C; then they are cut and the server exits.")
@click.option("--header-timeout", "header_timeout_s", type=click.FloatRange(0.1, 3600), default=10.0,
              show_default=True, help="Seconds a connection may take to send its request line and headers.")
@click.option("--body-timeout", "body_timeout_s", type=click.FloatRange(0.1, 3600), default=60.0, show_default=True,
              help="Seconds a request may take to send its body (408 beyond); it holds a slot meanwhile.")
@click.option("--max-connections", type=click.IntRange(1, 1 << 20), default=None,
              help="Open connections at most; more are closed as they arrive (default: the open-file limit less 256).")
@thinking_options
@click.option("--flash/--no-flash", "flash", default=None,
              help="InternVL3.5-Flash checkpoints: the resolution router on or off (full resolution). Default: the "
                   "config's flash_mode.")
@click.option("--verbose", "-v", is_flag=True, help="Log mlx-internvl's notes.")
def command(model_path, verbose, **options):
    """Serve a model over the OpenAI chat-completions and Responses APIs, with a web chat page at / and Prometheus
    metrics at /metrics.

    Under mlx.launch the model is split over the ranks; rank 0 alone listens."""
    if serve is None:
        raise UserError(f"the server needs FastAPI, uvicorn and prometheus-client ({MISSING}): pip install "
                        "'mlx-internvl[server]'")
    if options["allow_private_image_hosts"] and not options["allow_remote_images"]:
        raise UserError("--allow-private-image-hosts only widens --allow-remote-images: pass both, or neither")
    setup_logging(verbose)
    if verbose:  # why each remote image URL failed (its clients only see one text for any failure)
        logging.getLogger("mlx_internvl.server.media").setLevel(logging.DEBUG)
    # Launched as a group (mlx.launch): the model is split over the ranks, rank 0 alone listens, the others follow.
    group = distributed.start()
    click.echo(f"Loading {model_path}; then serving on http://{options['host']}:{options['port']} "
               "(chat page at /, API at /v1)", err=True)
    try:
        serve(model_path, group=group, **options)
    finally:
        if group is not None:
            group.close()

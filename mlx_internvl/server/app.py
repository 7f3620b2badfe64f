"""The FastAPI app: OpenAI routes (chat completions here, the Responses API in `responses.py`), the web chat page,
`/metrics` (`metrics.py`), and the rules every request passes (key, size, slots: `start.py`).

A request is parsed and rendered (counted against its budget first, then media fetched, decoded, tiled,
tokenized) on a worker thread, then handed to the engine's generation thread; its results come back through an
asyncio queue. Streams are FastAPI's native SSE (`fastapi.sse`). Every failure is an OpenAI-shaped error with its
status; nothing a client sends stops the server.

What a request must pass before its body is read (content type, origin, host) and the graceful stop are in
`guard.py`.
"""

from __future__ import annotations

import contextlib
import hmac
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import List, Optional, Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.sse import EventSourceResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import sharding
from ..errors import UserError
from ..loading import load
from ..sampling import SamplingOptions
from ..thinking import temperature_for
from . import caches, responses
from .budget import Limits
from .engine import Engine
from .guard import ACCEPT_BACKLOG, GracefulServer, HTTPProtocol, loopback_names
from .media import MediaPolicy
from .metrics import CountRequests, Metrics, metrics_route
from .protocol import APIError, new_id, parse_request
from .render import Renderer
from .replies import collect, stream
from .responses_protocol import ResponseStore
from .start import Started, start


@dataclass
class ServerConfig:
    """Everything `serve()` and `mlx-internvl serve` take, as one value."""

    model: str
    revision: Optional[str] = None
    adapter_path: Optional[str] = None
    dtype: Optional[str] = None
    template: Optional[str] = None
    model_name: Optional[str] = None  # the id clients use; default: the --model argument
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = None
    allowed_origins: Sequence[str] = ()
    allow_remote_images: bool = False
    allow_local_images: Optional[str] = None
    max_tiles: Optional[int] = None
    num_frames: int = 8
    max_images: int = 16  # per request (the caps of `budget.Limits`)
    max_frames: int = 64
    max_request_tiles: int = 128
    max_text_kb: float = 1024.0
    max_video_megapixels: float = 4000.0
    max_request_mb: float = 50.0
    max_image_mb: float = 20.0
    remote_timeout_s: float = 10.0
    allow_private_image_hosts: bool = False  # remote image URLs on loopback/private/link-local addresses
    vision_cache_size: int = 32
    prompt_cache_size: int = 16
    vision_cache_bytes: Optional[int] = None  # None: a share of the machine's memory (server/caches.py)
    prompt_cache_bytes: Optional[int] = None
    response_store_size: int = 256  # Responses API responses kept for previous_response_id
    response_store_bytes: int = 256 * 10**6
    decode_concurrency: int = 8
    max_queue: int = 32
    max_tokens: int = 1024
    temperature: float = 0.0
    thinking: Optional[bool] = None  # the default of requests that do not say (see thinking.py)
    thinking_budget: Optional[int] = None  # the default thinking_token_budget
    prefill_step_size: int = 512
    shutdown_timeout_s: float = 3.0  # how long running replies may go on after SIGTERM / Ctrl-C
    header_timeout_s: float = 10.0  # a connection's request line and headers, from its opening or its last reply
    body_timeout_s: float = 60.0  # a request's whole body, once its headers are in
    max_connections: Optional[int] = None  # open connections; None: the open-file limit less a margin
    flash: Optional[bool] = None  # InternVL3.5-Flash router: None follows the checkpoint's flash_mode
    served_names: List[str] = field(default_factory=list)

    def __post_init__(self):
        self.model_name = self.model_name or str(self.model)
        for name in ("prompt_cache_bytes", "vision_cache_bytes", "response_store_bytes"):
            if getattr(self, name) is not None:
                setattr(self, name, caches.parse_size(getattr(self, name), f"--{name.replace('_', '-')}"))


def _error(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@dataclass
class _Server:
    """What the route handlers share (kept on `app.state.server`)."""

    cfg: ServerConfig
    engine: Engine
    renderer: Renderer
    vocab: int
    limit: int
    created: int
    loopback_names: Optional[set] = None
    shutdown_at: Optional[float] = None  # monotonic time when running replies are ended (set on SIGTERM)

    def check_key(self, request: Request) -> None:
        if self.cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.cfg.api_key}".encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")

    def sampling(self, req, thinking: Optional[bool] = None) -> SamplingOptions:
        temperature = temperature_for(thinking, req.temperature)
        try:
            return SamplingOptions(
                temperature=self.cfg.temperature if temperature is None else temperature,
                top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                logit_bias=req.token_bias)
        except UserError as e:
            raise APIError(400, str(e), None, "invalid_value") from None


def start_engine(cfg: ServerConfig, group=None) -> Engine:
    """The generation thread for `cfg`, started (the model loaded). With a `group`, the model is split over its
    ranks and every rank runs this thread (rank 0 shares its requests with the others)."""
    def load_model():
        if group is not None:
            return sharding.load(group, cfg.model, dtype=cfg.dtype, adapter_path=cfg.adapter_path,
                                 revision=cfg.revision, template=cfg.template)
        return load(cfg.model, dtype=cfg.dtype, adapter_path=cfg.adapter_path, revision=cfg.revision,
                    template=cfg.template)

    engine = Engine(load_model, decode_concurrency=cfg.decode_concurrency, max_queue=cfg.max_queue,
                    prompt_cache_size=cfg.prompt_cache_size, vision_cache_size=cfg.vision_cache_size,
                    prefill_step_size=cfg.prefill_step_size, group=group,
                    prompt_cache_bytes=cfg.prompt_cache_bytes, vision_cache_bytes=cfg.vision_cache_bytes,
                    flash=cfg.flash)
    engine.start()
    return engine


def create_app(cfg: ServerConfig, engine: Optional[Engine] = None) -> FastAPI:
    """The app for `cfg`; starts the generation thread (which loads the model) unless `engine` is given."""
    if engine is None:
        engine = start_engine(cfg)
    policy = MediaPolicy(allow_remote=cfg.allow_remote_images, allow_private_hosts=cfg.allow_private_image_hosts,
                         local_root=Path(cfg.allow_local_images).expanduser() if cfg.allow_local_images else None,
                         max_bytes=int(cfg.max_image_mb * (1 << 20)), remote_timeout_s=cfg.remote_timeout_s)
    app = FastAPI(title="mlx-internvl", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.config = engine, cfg
    limits = Limits(max_images=cfg.max_images, max_frames=cfg.max_frames, max_request_tiles=cfg.max_request_tiles,
                    max_text_bytes=int(cfg.max_text_kb * 1024), max_video_pixels=int(cfg.max_video_megapixels * 1e6))
    app.state.server = _Server(cfg, engine, Renderer(engine.processor, policy, cfg.max_tiles, cfg.num_frames,
                                                     cfg.max_tokens, limits=limits,
                                                     routed=engine.model.use_flash(engine.flash_option)),
                               engine.model.config.llm_config["vocab_size"], int(cfg.max_request_mb * (1 << 20)),
                               int(time.time()), loopback_names(cfg.host, cfg.allowed_origins))
    if cfg.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.allowed_origins),
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"])
    app.state.metrics = Metrics(engine)
    app.add_middleware(CountRequests, metrics=app.state.metrics)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal)
    app.add_api_route("/", _page, methods=["GET"], response_class=HTMLResponse)
    app.mount("/static", _StaticFiles(packages=[("mlx_internvl.server", "static")]), name="static")
    app.add_api_route("/health", _health, methods=["GET"])
    app.add_api_route("/metrics", metrics_route, methods=["GET"])
    app.add_api_route("/v1/models", _models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", _chat_completions, methods=["POST"])
    app.state.responses = ResponseStore(cfg.response_store_size, cfg.response_store_bytes)
    app.add_api_route("/v1/responses", responses.create_response, methods=["POST"])
    app.add_api_route("/v1/responses/{response_id}", responses.get_response, methods=["GET"])
    app.add_api_route("/v1/responses/{response_id}", responses.delete_response, methods=["DELETE"])
    return app


async def _api_error(request: Request, e: APIError):
    return _error(e)


async def _http_error(request: Request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
    return _error(APIError(e.status_code, msg, None, code))


async def _validation_error(request: Request, e: RequestValidationError):
    return _error(APIError(400, str(e.errors()[0].get("msg", e))))


async def _internal(request: Request, e: Exception):
    return _error(APIError(500, f"internal error: {type(e).__name__}"))


# The page's second line of defence behind its sanitizer: it may load only its own files, so nothing a model writes
# can fetch a remote image, font or script or run inline script. Inline style attributes stay allowed (KaTeX sizes
# its output with them; CSS cannot run script, and remote url()s in it are still blocked by img-src and font-src).
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
            "img-src 'self' data: blob:; font-src 'self'; connect-src 'self'; media-src 'none'; object-src 'none'; "
            "frame-src 'none'; worker-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer"}


async def _page():
    page = resources.files("mlx_internvl.server").joinpath("static/chat.html").read_text("utf-8")
    return HTMLResponse(page, headers=PAGE_HEADERS)


class _StaticFiles(StaticFiles):
    """The page's scripts, styles and fonts, with the page's headers (so /static/chat.html has its policy too)."""

    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


async def _health(request: Request):
    st: _Server = request.app.state.server
    ok = st.engine.alive
    body = {"status": "ok" if ok else "dead", "model": st.cfg.model_name, "inflight": st.engine.inflight,
            "stats": st.engine.stats}
    return JSONResponse(body, status_code=200 if ok else 503)


async def _models(request: Request):
    st: _Server = request.app.state.server
    st.check_key(request)
    return {"object": "list", "data": [{"id": st.cfg.model_name, "object": "model", "created": st.created,
                                        "owned_by": "mlx-internvl"}]}


async def _chat_completions(request: Request):
    st: _Server = request.app.state.server
    started = await start(request, st, lambda raw: parse_request(raw, st.vocab))
    if not isinstance(started, Started):
        return started
    req, job, tools = started.req, started.job, started.tools
    template = st.renderer.processor.template  # GPT-OSS replies are split by their harmony channels
    if req.stream:
        return EventSourceResponse(stream(job, started.first, started.events.next, new_id(), st.cfg.model_name, req,
                                          tools, template), headers={"Cache-Control": "no-cache"})
    return await collect(started.first, started.events, st.cfg.model_name, req, tools, template)


def serve(model: str, group=None, **options) -> None:
    """Serve `model` until interrupted. Options are `ServerConfig`'s fields (host, port, api_key, max_tiles, ...).
    With a `distributed.Group`, every rank calls this: rank 0 listens, the others follow its generation loop until
    rank 0 stops."""
    cfg = ServerConfig(model=model, **options)
    engine = start_engine(cfg, group)
    if group is not None and not group.is_leader:
        # Ctrl-C reaches every local rank; only rank 0 acts on it, then tells the others to stop at a step boundary.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        engine.wait()
        return
    app = create_app(cfg, engine)
    print(f"Serving {cfg.model_name} on http://{cfg.host}:{cfg.port} (chat page at /, API at /v1)", file=sys.stderr,
          flush=True)
    server = GracefulServer(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                            timeout_graceful_shutdown=cfg.shutdown_timeout_s + 2, http=HTTPProtocol,
                                            backlog=ACCEPT_BACKLOG))
    try:
        server.run()
    finally:
        app.state.engine.close()


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0):
    """Run `app` with uvicorn on a background thread; yields the base URL (port 0: a free port). The app's engine is
    closed on exit."""
    server = GracefulServer(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                           http=HTTPProtocol, backlog=ACCEPT_BACKLOG))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.engine.close()

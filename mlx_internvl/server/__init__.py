"""`mlx-internvl serve`: an OpenAI-compatible chat-completions server with a built-in web chat page.

`serve(model, ...)` runs it (uvicorn, localhost by default); `create_app(ServerConfig(...))` gives the FastAPI app.
FastAPI and uvicorn come with the `server` extra: `pip install 'mlx-internvl[server]'`.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

from ..errors import UserError


def _require():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError("the server needs FastAPI and uvicorn: pip install 'mlx-internvl[server]'") from e


def serve(model: str, **options) -> None:
    """Serve `model` until interrupted. Options are `ServerConfig`'s fields (host, port, api_key, max_tiles, ...)."""
    _require()
    import uvicorn

    from .app import ServerConfig, create_app

    cfg = ServerConfig(model=model, **options)
    app = create_app(cfg)
    print(f"Serving {cfg.model_name} on http://{cfg.host}:{cfg.port} (chat page at /, API at /v1)", file=sys.stderr,
          flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        app.state.engine.close()


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0):
    """Run `app` with uvicorn on a background thread; yields the base URL (port 0: a free port)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
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
        engine = getattr(app.state, "engine", None)
        if engine is not None:
            engine.close()


__all__ = ["serve", "running"]

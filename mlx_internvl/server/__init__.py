"""`mlx-internvl serve`: an OpenAI-compatible server (chat completions and the Responses API) with a built-in web
chat page and Prometheus metrics.

`serve(model, ...)` runs it (uvicorn, localhost by default); `create_app(ServerConfig(...))` gives the FastAPI app;
`running(app)` serves an app on a background thread (tests, benchmarks). Needs the `server` extra
(`pip install 'mlx-internvl[server]'`: FastAPI, uvicorn and prometheus-client).
"""

from .app import ServerConfig, create_app, running, serve

__all__ = ["ServerConfig", "create_app", "running", "serve"]

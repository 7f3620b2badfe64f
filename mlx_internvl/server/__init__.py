"""`mlx-internvl serve`: an OpenAI-compatible chat-completions server with a built-in web chat page.

`serve(model, ...)` runs it (uvicorn, localhost by default); `create_app(ServerConfig(...))` gives the FastAPI app;
`running(app)` serves an app on a background thread (tests, benchmarks). Needs the `server` extra
(`pip install 'mlx-internvl[server]'`: FastAPI and uvicorn).
"""

from .app import ServerConfig, create_app, running, serve

__all__ = ["ServerConfig", "create_app", "running", "serve"]

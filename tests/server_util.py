"""Helpers shared by the server tests: a served tiny checkpoint and OpenAI-style message builders."""

from __future__ import annotations

import base64
import contextlib
import logging
from pathlib import Path

from conftest import ASSETS

IMG1, IMG2 = ASSETS / "images" / "image1.jpg", ASSETS / "images" / "chelsea.png"


def data_url(path: Path) -> str:
    mime = "image/png" if path.suffix == ".png" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def user(text: str, *images: Path) -> dict:
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text}]
            + [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in images]}


@contextlib.contextmanager
def serving(model_dir, **options):
    """A server for `model_dir` on 127.0.0.1 at a free port; yields (base_url, app)."""
    from mlx_internvl.server import running
    from mlx_internvl.server.app import ServerConfig, create_app

    options.setdefault("model_name", "tiny")
    options.setdefault("dtype", "float32")
    app = create_app(ServerConfig(model=str(model_dir), port=0, **options))
    with running(app) as url:
        yield url, app


def assert_quiet_log(capfd, caplog) -> None:
    """Nothing the server logged (uvicorn writes to stderr, our loggers reach caplog) is an error or a traceback."""
    log = capfd.readouterr().err
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage()[-2000:] for r in bad]

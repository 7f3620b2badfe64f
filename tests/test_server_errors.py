"""Every bad request gets a clear OpenAI-shaped 4xx, quickly, and the server keeps serving (docs/serve.md's table of
bad requests is printed by `python tests/server_bad_requests.py` from the same cases)."""

import contextlib
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from builders import Case
from docs_regions import docs_tables
from server_bad_requests import KEY, image_message, run, send, strict_options, table
from server_util import IMG1, assert_quiet_log, serving

pytest.importorskip("fastapi")


@contextlib.contextmanager
def photo_server(data: bytes):
    class Photo(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Photo)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/photo.jpg"
    finally:
        srv.shutdown()


def test_bad_requests_get_4xx_and_the_server_lives(build_case, tmp_path, capfd, caplog):
    built = build_case(Case("smoke_qwen2"))
    local = tmp_path / "allowed"
    local.mkdir()
    (local / "photo.jpg").write_bytes(IMG1.read_bytes())
    with serving(built.original_dir, **strict_options(local)) as (strict, _), \
            serving(built.original_dir, api_key=KEY) as (lax, _):
        rows = run(strict, lax, local)
        # docs/serve.md's table is what these requests get now (`python benchmarks/docs_tables.py --write` renders it)
        assert table(rows, str(tmp_path)) == docs_tables().committed("server-errors"), \
            "docs/serve.md's table of bad requests is stale: run `python benchmarks/docs_tables.py --write`"
        expected = {"malformed JSON": 400, "huge body (2 MB, limit 1 MB)": 413, "wrong API key": 401,
                    "unknown model": 404, "unknown route": 404,
                    "`text/plain` POST from another site (no CORS preflight)": 415,
                    "form-encoded POST (what `curl -d` sends without `-H`)": 415,
                    "JSON POST from an origin not in --allowed-origins": 403,
                    "`Host` of another name (DNS rebinding)": 403}
        codes = {"JSON nested 10,000 deep": "invalid_json", "a 5,000-digit number": "invalid_json",
                 "`seed: 2**64` (MLX takes [0, 2**64))": "invalid_value", "`max_tokens: 2**40`": "invalid_value",
                 "local path with a NUL byte": "invalid_path", "`file://` URL with `%00`": "invalid_path",
                 "symlink loop under --allow-local-images": "invalid_path",
                 "JSON POST from an origin not in --allowed-origins": "origin_not_allowed",
                 "`Host` of another name (DNS rebinding)": "host_not_allowed"}
        wrong = [(what, status, code, message) for what, status, code, message, seconds in rows
                 if status != expected.get(what, 400) or code != codes.get(what, code) or not message
                 or "Traceback" in message or seconds >= 10  # the trickling download is cut at its 1 s deadline
                 or (what.startswith("`logit_bias` key") and not message.startswith("logit_bias: key"))]
        assert not wrong, wrong
        by_what = {r[0]: r for r in rows}
        assert by_what["image URL that trickles forever (1 s deadline)"][4] < 4
        assert "outside" in by_what["`../` path with --allow-local-images"][3]
        assert "outside" in by_what["symlink out of the allowed directory"][3]
        assert "512" in by_what["prompt longer than the context"][3]  # says the limit
        # still alive, and the allowed local file works
        req = urllib.request.Request(strict + "/v1/chat/completions", method="POST", data=json.dumps(
            {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "photo.jpg"}}]}]}).encode(),
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.load(r)["choices"][0]["message"]["role"] == "assistant"
        # ... and so does a remote image that arrives in time (a local HTTP server)
        with photo_server(IMG1.read_bytes()) as photo_url:
            status, reply = send(strict, dict(image_message(photo_url), max_tokens=3))
        assert status == 200 and reply["usage"]["prompt_tokens"] > 100, reply
        with urllib.request.urlopen(strict + "/health") as r:
            assert json.load(r)["status"] == "ok"
    assert_quiet_log(capfd, caplog)



def test_image_checks_never_write_pils_global_limit(monkeypatch):
    """Requests decode on several threads at once, so the bomb check must only read `Image.MAX_IMAGE_PIXELS`."""
    import sys
    import types

    from PIL import Image

    from mlx_internvl.server.media import Media, decode_image
    from mlx_internvl.server.protocol import APIError
    from server_bad_requests import png_header_only, small_png

    writes = []

    class Watched(types.ModuleType):
        def __setattr__(self, name, value):
            writes.append(name)
            super().__setattr__(name, value)

    module = sys.modules["PIL.Image"]
    monkeypatch.setattr(module, "__class__", Watched)
    try:
        assert decode_image(Media(small_png(), "x"), "p", Image.MAX_IMAGE_PIXELS).size == (32, 24)
        for w in (10000, 50000):
            with pytest.raises(APIError) as e:
                decode_image(Media(png_header_only(w, w), "x"), "p", Image.MAX_IMAGE_PIXELS)
            assert e.value.status == 400 and "pixels" in e.value.message
    finally:
        module.__class__ = types.ModuleType
    assert "MAX_IMAGE_PIXELS" not in writes


def test_cors_only_for_allowed_origins(build_case):
    built = build_case(Case("smoke_qwen2"))
    with serving(built.original_dir, allowed_origins=["http://localhost:3000"]) as (url, _):
        def preflight(origin):
            req = urllib.request.Request(url + "/v1/chat/completions", method="OPTIONS", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST"})
            try:
                with urllib.request.urlopen(req) as r:
                    return r.headers.get("access-control-allow-origin")
            except urllib.error.HTTPError as e:
                return e.headers.get("access-control-allow-origin")

        assert preflight("http://localhost:3000") == "http://localhost:3000"
        assert preflight("http://evil.example") is None

"""Bad requests sent to a running server over raw HTTP, and what came back: used by `test_server_errors.py`, and
`python tests/server_bad_requests.py` prints docs/serve.md's table (it builds the tiny test checkpoint and serves it).

The server for these is started with an API key, `--allow-remote-images --allow-private-image-hosts` (1 s
deadline; the image servers are on 127.0.0.1), `--allow-local-images` on a temporary directory and a 1 MB request
limit, so that each rule has something to refuse."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

KEY = "test-key"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels but holds almost no data: a decompression-bomb header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def small_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def free_closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextlib.contextmanager
def trickling_server():
    """127.0.0.1 server whose image download never ends: headers, then one byte every 0.2 s."""
    class Slow(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/photo.png"
    finally:
        srv.shutdown()


def image_message(url: str) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]}


def b64(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def cases(local_dir: Path, slow_url: str):
    """(what was sent, body bytes or dict, headers override, path)."""
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
    (local_dir / "escape.png").unlink(missing_ok=True)
    (local_dir / "escape.png").symlink_to("/etc/hostname")
    (local_dir / "loop.png").unlink(missing_ok=True)
    (local_dir / "loop.png").symlink_to("loop.png")
    deep = b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "tools": ' + b"[" * 10000 + b"]" * 10000
    return [
        ("malformed JSON", b'{"model": "tiny", "messages": [', None, None),
        ("wrong type (`max_tokens: \"5\"`)", dict(ok, max_tokens="5"), None, None),
        ("wrong type (`messages: \"Hi\"`)", dict(ok, messages="Hi"), None, None),
        ("out of range (`temperature: 5`)", dict(ok, temperature=5), None, None),
        ("no messages", dict(ok, messages=[]), None, None),
        ("JSON nested 10,000 deep", deep + b"}", None, None),
        ("a 5,000-digit number", b'{"model": "tiny", "max_tokens": ' + b"9" * 5000 + b"}", None, None),
        ("`seed: 2**64` (MLX takes [0, 2**64))", dict(ok, seed=2**64, temperature=1.0), None, None),
        ("`max_tokens: 2**40`", dict(ok, max_tokens=2**40), None, None),
        ("`logit_bias` key `\"²\"`", dict(ok, logit_bias={"²": 1}), None, None),
        ("`logit_bias` key `\"--5\"`", dict(ok, logit_bias={"--5": 1}), None, None),
        ("`logit_bias` key of 5,000 digits", dict(ok, logit_bias={"7" * 5000: 1}), None, None),
        ("last message from the assistant", dict(ok, messages=[{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "Hello"}]), None, None),
        ("huge body (2 MB, limit 1 MB)", dict(ok, pad="x" * (2 << 20)), None, None),
        ("bad base64 in a data: URL", image_message("data:image/png;base64,!!not base64!!"), None, None),
        ("not an image (text bytes)", image_message(b64(b"hello, world", "text/plain")), None, None),
        ("decompression bomb (PNG header claiming 50000x50000)", image_message(b64(png_header_only(50000, 50000))),
         None, None),
        ("decompression bomb (PNG header claiming 10000x10000)",
         image_message(b64(png_header_only(10000, 10000))), None, None),
        ("two `<image>` for one image", {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<image> <image>"}, {"type": "image_url", "image_url": {
                "url": b64(small_png())}}]}]}, None, None),
        ("image URL to a closed port", image_message(f"http://127.0.0.1:{free_closed_port()}/x.png"), None, None),
        ("image URL that trickles forever (1 s deadline)", image_message(slow_url), None, None),
        ("local path without --allow-local-images", None, None, None),  # filled in by the runner (other server)
        ("`../` path with --allow-local-images", image_message("../../etc/hostname"), None, None),
        ("symlink out of the allowed directory", image_message("escape.png"), None, None),
        ("local path with a NUL byte", image_message("photo\0.png"), None, None),
        ("`file://` URL with `%00`", image_message("file:///photo%00.png"), None, None),
        ("symlink loop under --allow-local-images", image_message("loop.png"), None, None),
        ("prompt longer than the context", dict(ok, messages=[{"role": "user", "content": "word " * 2000}]), None,
         None),
        ("wrong API key", ok, {"Authorization": "Bearer wrong"}, None),
        ("`text/plain` POST from another site (no CORS preflight)", ok,
         {"Content-Type": "text/plain", "Origin": "http://evil.example"}, None),
        ("form-encoded POST (what `curl -d` sends without `-H`)", ok, {"Content-Type": None}, None),
        ("JSON POST from an origin not in --allowed-origins", ok, {"Origin": "http://evil.example"}, None),
        ("`Host` of another name (DNS rebinding)", ok, {"Host": "evil.example", "Origin": "http://evil.example"},
         None),
        ("unknown model", dict(ok, model="gpt-4o"), None, None),
        ("`n: 2`", dict(ok, n=2), None, None),
        ("`response_format` with an invalid JSON Schema", dict(ok, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}), None, None),
        ("`tools` entry with a bad function name", dict(ok, tools=[{"type": "function", "function": {
            "name": "get weather"}}]), None, None),
        ("`tool_choice` naming a function not in `tools`", dict(ok, tools=[{"type": "function", "function": {
            "name": "f"}}], tool_choice={"type": "function", "function": {"name": "g"}}), None, None),
        ("unknown route", ok, None, "/v1/embeddings"),
    ]


def send(url: str, body, headers=None, path=None):
    """(status, error body dict) of one raw POST (headers given as None are left out)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    h.update(headers or {})
    h = {k: v for k, v in h.items() if v is not None}
    req = urllib.request.Request(url + (path or "/v1/chat/completions"), data=data, headers=h, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def run(strict_url: str, open_url: str, local_dir: Path):
    """Rows (what, status, code, message, seconds) for every case; `open_url` is a server without the local flag."""
    rows = []
    with trickling_server() as slow:
        for what, body, headers, path in cases(local_dir, slow):
            url = strict_url
            if body is None:
                url, body = open_url, image_message("photo.png")
            t = time.monotonic()
            status, reply = send(url, body, headers, path)
            err = reply.get("error", {})
            rows.append((what, status, err.get("code"), err.get("message", ""), time.monotonic() - t))
    return rows


def table(rows, tmp: str = "") -> str:
    """The docs' table; ports and the temporary directory `tmp` are written as <port> and <tmp>, so the table is the
    same from run to run."""
    import re

    out = ["| Sent | Status | `code` | Message (shortened) |", "|---|---|---|---|"]
    for what, status, code, message, _ in rows:
        message = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", message)
        if tmp:
            message = message.replace(str(Path(tmp).resolve()), "<tmp>").replace(str(tmp), "<tmp>")
        msg = message if len(message) < 130 else message[:127] + "..."
        out.append(f"| {what} | {status} | {code or ''} | {msg.replace('|', '/')} |")
    return "\n".join(out)


def live_table() -> str:
    """Build the tiny test checkpoint, serve it, send every bad request, and return the docs' table."""
    import sys
    import tempfile

    here = Path(__file__).parent
    sys.path.insert(0, str(here))
    from builders import Case, build
    from server_util import serving

    with tempfile.TemporaryDirectory() as tmp:
        built = build(Case("smoke_qwen2"), Path(tmp) / "ckpt")
        local = Path(tmp) / "allowed"
        local.mkdir()
        with serving(built.original_dir, **strict_options(local)) as (strict, _), \
                serving(built.original_dir, api_key=KEY) as (lax, _):
            return table(run(strict, lax, local), tmp)


def main():
    print(live_table())


def strict_options(local_dir: Path) -> dict:
    return dict(api_key=KEY, allow_remote_images=True, allow_private_image_hosts=True,
                allow_local_images=str(local_dir), max_request_mb=1, remote_timeout_s=1.0)


if __name__ == "__main__":
    main()

"""The built-in chat page in a real headless browser (Debian's `chromium`, driven over the DevTools protocol):
attach a real photo through the page's file input, ask, watch the reply stream in, ask a follow-up that reuses the
server's caches, stop a long reply, draw a grounding box, and save a screenshot.

Set MLX_INTERNVL_SCREENSHOT=path to keep the screenshot (docs/server-chat.png is made that way)."""

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from builders import Case
from server_util import IMG1, data_url, serving

pytest.importorskip("fastapi")
websocket = pytest.importorskip("websocket")
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium; "
                                                          ".ci/run installs it)")


class Browser:
    """A headless chromium and one page, spoken to with the Chrome DevTools protocol."""

    def __init__(self, tmp: Path):
        profile = tmp / "profile"
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--remote-debugging-port=0", "--remote-allow-origins=*", "--window-size=1280,900",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.n = 0

    def call(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expr):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expr, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.js(expr)
            except RuntimeError:  # e.g. the page is still loading
                value = None
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"waited {timeout} s for {expr}")

    def close(self):
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


ASSISTANT = "document.querySelectorAll('.msg.assistant')"


def ask(b: Browser, question: str, k: int):
    """Type `question`, send it, and wait for the k-th reply; returns the number of text updates seen."""
    b.js("window.__updates = 0; new MutationObserver(() => window.__updates++).observe(document.getElementById('log'),"
         " {childList: true, subtree: true, characterData: true}); true")
    b.js(f"document.getElementById('input').value = {json.dumps(question)}; document.getElementById('send').click();"
         " true")
    b.wait(f"{ASSISTANT}.length >= {k} && {ASSISTANT}[{k - 1}].dataset.done === '1'")
    return b.js("window.__updates")


def test_chat_page_in_chromium(build_case, tmp_path):
    built = build_case(Case("smoke_qwen2"))
    with serving(built.original_dir) as (url, app):
        b = Browser(tmp_path)
        try:
            b.call("Page.enable")
            b.call("Page.navigate", url=url + "/")
            b.wait("document.getElementById('model').textContent === 'tiny'")
            b.js("document.getElementById('maxTokens').value = 48; document.getElementById('maxTiles').value = 2; 1")
            # a real photo through the page's own file input, as the picker would set it
            root = b.call("DOM.getDocument")["root"]["nodeId"]
            node = b.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
            b.call("DOM.setFileInputFiles", nodeId=node, files=[str(IMG1.resolve())])
            b.wait("window.mlxChat.state.pending.length === 1")

            updates = ask(b, "What is in this photo?", 1)
            reply1 = b.js(f"{ASSISTANT}[0].querySelector('.body').textContent")
            stats1 = b.js(f"{ASSISTANT}[0].querySelector('.stats').textContent")
            assert reply1 and "TTFT" in stats1 and "tokens/s" in stats1, stats1
            assert updates >= 3  # the reply arrived in pieces, not at once
            assert b.js("document.querySelectorAll('.msg.user .thumbs img').length") == 1

            ask(b, "And what colours do you see?", 2)
            stats2 = b.js(f"{ASSISTANT}[1].querySelector('.stats').textContent")
            cached = int(stats2.split("(")[1].split(" cached")[0])
            assert cached > 0.5 * int(stats2.split(" prompt tokens")[0].split("· ")[-1])
            assert len(b.js("window.mlxChat.state.history")) == 4

            shot = base64.b64decode(b.call("Page.captureScreenshot", format="png")["data"])
            assert shot[:8] == b"\x89PNG\r\n\x1a\n"
            (tmp_path / "chat.png").write_bytes(shot)
            if os.environ.get("MLX_INTERNVL_SCREENSHOT"):
                Path(os.environ["MLX_INTERNVL_SCREENSHOT"]).write_bytes(shot)

            # Stop: a long reply is cut short, and the server frees its slot
            b.js("document.getElementById('clear').click(); document.getElementById('maxTokens').value = 2000;"
                 " document.getElementById('input').value = 'Tell me more.';"
                 " document.getElementById('send').click(); true")
            b.wait(f"{ASSISTANT}.length === 1 && {ASSISTANT}[0].querySelector('.body').textContent.length > 0")
            b.js("document.getElementById('stop').click(); true")
            b.wait(f"{ASSISTANT}[0].dataset.done === '1'")
            assert "stopped" in b.js(f"{ASSISTANT}[0].querySelector('.stats').textContent")
            deadline = time.monotonic() + 20
            while app.state.engine.inflight and time.monotonic() < deadline:
                time.sleep(0.05)
            assert app.state.engine.inflight == 0

            # grounding output is parsed and drawn on the last image, in 0-1000 coordinates
            boxes = b.js("window.mlxChat.parseGrounding('A <ref>cat</ref><box>[[100,200,600,900]]</box>.')")
            assert boxes == [{"label": "cat", "box": [100, 200, 600, 900]}]
            b.js("const d = document.createElement('div'); d.id = 'g'; document.body.append(d);"
                 f" window.mlxChat.drawBoxes(d, {json.dumps(data_url(IMG1))},"
                 " window.mlxChat.parseGrounding('<ref>cat</ref><box>[[100,200,600,900]]</box>')); true")
            b.wait("document.getElementById('g').dataset.boxes === '1'")
            edge = b.js("(() => { const c = document.querySelector('#g canvas'); const x = Math.round(c.width * 0.35);"
                        " const y = Math.round(c.height * 0.2); return Array.from(c.getContext('2d')"
                        ".getImageData(x, y, 1, 1).data); })()")
            assert edge[3] > 0  # the box's top edge is painted where 0-1000 coordinates put it
        finally:
            b.close()

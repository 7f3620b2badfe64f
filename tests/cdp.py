"""A headless Debian `chromium` driven over the Chrome DevTools protocol, for the chat page's browser tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import websocket

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium;"
                                                             " .ci/run installs it)")


class Browser:
    """A headless chromium and one page, spoken to with the Chrome DevTools protocol. Events that arrive while a
    command waits for its answer are kept in `events` (read them with `event` and `drain`)."""

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
        self.events: list = []

    def call(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            if "method" in msg:
                self.events.append(msg)

    def event(self, method, timeout=30.0) -> dict:
        """The params of the first `method` event not yet taken, waiting for it up to `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            for i, msg in enumerate(self.events):
                if msg["method"] == method:
                    return self.events.pop(i)["params"]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {method} event in {timeout} s")
            self.ws.settimeout(left)
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            finally:
                self.ws.settimeout(30)
            if "method" in msg:
                self.events.append(msg)

    def drain(self, method) -> list:
        """The params of every `method` event received so far (taken out of `events`)."""
        self.call("Runtime.evaluate", expression="1")  # a round trip: events sent before it have arrived
        taken = [m["params"] for m in self.events if m["method"] == method]
        self.events = [m for m in self.events if m["method"] != method]
        return taken

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

"""The built-in chat page in a real headless browser (Debian's `chromium`, driven over the DevTools protocol):
attach a real photo through the page's file input, ask, watch the reply stream in, ask a follow-up that reuses the
server's caches, stop a long reply, draw a grounding box, and save a screenshot (under the test's tmp folder; the
docs' screenshot comes from test_server_page_render.py)."""

import base64
import json
import time

import pytest

from builders import Case
from server_util import IMG1, data_url, serving

pytest.importorskip("fastapi")
pytest.importorskip("websocket")
from cdp import ASSISTANT, Browser, ask, needs_chromium  # noqa: E402  (after the skips: cdp imports websocket)

pytestmark = needs_chromium


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

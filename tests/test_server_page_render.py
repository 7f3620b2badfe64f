"""How the chat page renders replies, in headless Chromium: Markdown (a table, a list, fenced code with its Copy
button) and TeX math typeset by KaTeX; hostile replies that must neither run script nor load anything remote; the
page's Content-Security-Policy on its own; JSON mode; OpenAI tool calls and their results.

The page talks to a real server (for the page, its files and its headers); the replies under test are canned
`chat.completion.chunk` streams handed to the page's own fetch through the DevTools Fetch domain, so the page's
whole path (request, SSE parsing, rendering) runs on exactly the text the test chose.

Set MLX_INTERNVL_SCREENSHOT=path to keep the Markdown screenshot (docs/server-chat.png is made that way)."""

import base64
import json
import os
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from builders import Case
from server_util import IMG1, serving

pytest.importorskip("fastapi")
pytest.importorskip("websocket")
from cdp import ASSISTANT, Browser, needs_chromium  # noqa: E402  (after the skips: cdp imports websocket)

from mlx_internvl.server.app import PAGE_CSP  # noqa: E402

pytestmark = needs_chromium

CODE = "def area(r):\n    return 3.14159 * r ** 2"
TEX = [r"E = mc^2", r"a^2 + b^2 = c^2", r"\int_0^1 x^2 \, dx = \frac{1}{3}", r"\sum_{k=1}^{n} k = \frac{n(n+1)}{2}"]
MARKDOWN = f"""## Findings

Three things stand out:

- the cat is **grey**
- it sits on a `mat`
- it looks to the left

| animal | legs |
|--------|-----:|
| cat    | 4    |
| bird   | 2    |

```python
{CODE}
```

Einstein wrote ${TEX[0]}$, Pythagoras \\({TEX[1]}\\). A ticket costs $5 or $6. More in [the notes](https://example.org/n).

$$
{TEX[2]}
$$

\\[ {TEX[3]} \\]
"""

HOSTILE = r"""Before the payloads.

<img src=x onerror="window.__pwned='img'">

<script>window.__pwned='script'</script>

Click [this link](javascript:window.__pwned='link') or [that one](JaVaScRiPt:window.__pwned='link2'), or
<javascript:window.__pwned='auto'>.

<iframe src="javascript:window.__pwned='iframe'"></iframe>

A remote image: ![tracker](http://example.invalid/a.png)

Inline <svg onload="window.__pwned='svg'"></svg> and <a href="javascript:window.__pwned='a'">a raw link</a>.

<style>@import url(http://example.invalid/s.css); body { background: url(http://example.invalid/b.png) }</style>

Math cannot link or load: $\href{javascript:window.__pwned='tex'}{x}$ and \(\includegraphics{http://example.invalid/i.png}\).

After the payloads.
"""


def chunks_sse(deltas, finish="stop") -> str:
    """A streamed reply in OpenAI's wire format: one chunk per delta, the finish chunk, usage, [DONE]."""
    def chunk(choices, **extra):
        return {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
                "choices": choices, **extra}
    events = [chunk([{"index": 0, "delta": d, "finish_reason": None}]) for d in deltas]
    events.append(chunk([{"index": 0, "delta": {}, "finish_reason": finish}]))
    events.append(chunk([], usage={"prompt_tokens": 12, "completion_tokens": len(deltas), "total_tokens": 12
                                   + len(deltas), "prompt_tokens_details": {"cached_tokens": 0}}))
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def pieces(text: str, n: int = 5):
    """`text` as content deltas of n characters, as a model streams it."""
    return [{"content": text[i:i + n]} for i in range(0, len(text), n)]


@pytest.fixture(scope="module")
def page(build_case, tmp_path_factory):
    """(browser, base url) with the page loaded; the page's chat requests wait for the test to answer them."""
    built = build_case(Case("smoke_qwen2"))
    with serving(built.original_dir) as (url, _app):
        b = Browser(tmp_path_factory.mktemp("chromium"))
        try:
            b.call("Network.enable")
            b.call("Fetch.enable", patterns=[{"urlPattern": "*/v1/chat/completions", "requestStage": "Request"}])
            b.call("Browser.grantPermissions", origin=url,
                   permissions=["clipboardReadWrite", "clipboardSanitizedWrite"])
            b.call("Emulation.setFocusEmulationEnabled", enabled=True)  # the clipboard wants a focused page
            b.call("Page.enable")
            b.call("Page.navigate", url=url + "/")
            b.wait("document.getElementById('model').textContent === 'tiny'")
            b.js("window.__violations = []; document.addEventListener('securitypolicyviolation', (e) =>"
                 " window.__violations.push(e.effectiveDirective + ' ' + e.blockedURI)); true")
            yield b, url
        finally:
            b.close()


def fresh(b: Browser):
    b.js("document.getElementById('clear').click(); document.getElementById('json').checked = false;"
         " document.getElementById('tools').value = ''; window.__pwned = undefined; window.__violations = []; true")
    b.drain("Network.requestWillBeSent")


def turn(b: Browser, question: str, deltas, k: int = 1, finish: str = "stop") -> dict:
    """Send `question` from the composer, answer the page's request with the canned `deltas` (None: let the server
    answer), wait for the k-th reply to finish; returns the request the page sent."""
    b.js(f"document.getElementById('input').value = {json.dumps(question)}; document.getElementById('send').click();"
         " true")
    paused = b.event("Fetch.requestPaused")
    if deltas is None:
        b.call("Fetch.continueRequest", requestId=paused["requestId"])
    else:
        body = base64.b64encode(chunks_sse(deltas, finish).encode()).decode()
        b.call("Fetch.fulfillRequest", requestId=paused["requestId"], responseCode=200, body=body,
               responseHeaders=[{"name": "Content-Type", "value": "text/event-stream"}])
    b.wait(f"{ASSISTANT}.length >= {k} && {ASSISTANT}[{k - 1}].dataset.done === '1'")
    post = paused["request"].get("postData")  # left out when large (a photo attached)
    return json.loads(post) if post else {}


def requested_hosts(b: Browser) -> set:
    return {urlsplit(e["request"]["url"]).netloc for e in b.drain("Network.requestWillBeSent")
            if not e["request"]["url"].startswith(("data:", "blob:"))}


def test_markdown_and_math(page, tmp_path):
    b, url = page
    fresh(b)
    root = b.call("DOM.getDocument")["root"]["nodeId"]
    b.call("DOM.setFileInputFiles", nodeId=b.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"],
           files=[str(IMG1.resolve())])
    b.wait("window.mlxChat.state.pending.length === 1")
    deltas = pieces(MARKDOWN)
    turn(b, "What do you see? Show the formulas too.", deltas)
    body = f"{ASSISTANT}[0].querySelector('.body')"
    assert b.js(f"{body}.querySelector('h2').textContent") == "Findings"
    assert b.js(f"[...{body}.querySelectorAll('ul > li')].map(e => e.textContent)") == [
        "the cat is grey", "it sits on a mat", "it looks to the left"]
    assert b.js(f"{body}.querySelector('li strong').textContent") == "grey"
    assert b.js(f"[...{body}.querySelectorAll('table th')].map(e => e.textContent)") == ["animal", "legs"]
    assert b.js(f"[...{body}.querySelectorAll('table tbody tr')].map(r => [...r.cells].map(c => c.textContent))") \
        == [["cat", "4"], ["bird", "2"]]
    assert b.js(f"{body}.querySelector('.code pre code.language-python').textContent").rstrip("\n") == CODE
    assert b.js(f"{body}.querySelector('.code button.copy').textContent") == "Copy"
    b.js(f"{body}.querySelector('.code button.copy').click(); true")
    b.wait(f"{body}.querySelector('.code button.copy').textContent === 'Copied'")
    assert b.js("navigator.clipboard.readText()") == CODE

    # KaTeX typeset every formula (its MathML keeps the TeX it read), two of them as display math
    assert b.js(f"[...{body}.querySelectorAll('.katex annotation')].map(e => e.textContent)") == TEX
    assert b.js(f"{body}.querySelectorAll('.katex-display').length") == 2
    assert b.js(f"{body}.querySelector('.katex-display .katex-html').getBoundingClientRect().width") > 0
    assert "A ticket costs $5 or $6." in b.js(f"{body}.textContent")  # prices are not math
    link = b.js(f"(a => [a.getAttribute('href'), a.target, a.rel])({body}.querySelector('a'))")
    assert link == ["https://example.org/n", "_blank", "noopener noreferrer nofollow"]
    b.js("document.fonts.ready.then(() => true)")
    assert b.js("[...document.fonts].some(f => f.family === 'KaTeX_Main' && f.status === 'loaded')")

    # re-rendered as it streamed, but far less often than once per piece
    assert 1 <= int(b.js(f"{body}.dataset.renders")) < len(deltas) / 4
    assert requested_hosts(b) <= {urlsplit(url).netloc}  # the libraries, CSS and fonts all came from the server

    b.call("Emulation.setDeviceMetricsOverride", width=1280, height=1040, deviceScaleFactor=1, mobile=False)
    shot = base64.b64decode(b.call("Page.captureScreenshot", format="png")["data"])
    b.call("Emulation.clearDeviceMetricsOverride")
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "markdown.png").write_bytes(shot)
    if os.environ.get("MLX_INTERNVL_SCREENSHOT"):
        Path(os.environ["MLX_INTERNVL_SCREENSHOT"]).write_bytes(shot)


def test_streaming_render_patches_only_what_changed(page):
    """A long reply arriving in small pieces: renders are batched per frame, finished blocks stay in place, and the
    end result is exactly what rendering the whole text at once gives."""
    b, _ = page
    fresh(b)
    out = b.js("(async () => {"
               f" const text = {json.dumps(MARKDOWN)}.repeat(15);"
               " const el = document.createElement('div'); document.getElementById('log').append(el);"
               " const view = mlxChat.render.liveView(el, mlxChat.render.renderMarkdown);"
               " let updates = 0, first = null;"
               " for (let i = 4; i < text.length; i += 4) {"
               "   view.update(text.slice(0, i)); updates++;"
               "   if (updates % 40 === 0) await new Promise((r) => requestAnimationFrame(r));"
               "   if (first === null && el.children.length > 3) first = el.firstElementChild; }"
               " view.flush(text);"
               " const whole = document.createElement('div'); mlxChat.render.renderMarkdown(whole, text);"
               " return { updates, renders: +el.dataset.renders, kept: el.firstElementChild === first,"
               "          same: el.innerHTML === whole.innerHTML, blocks: el.children.length }; })()")
    assert out["same"] and out["kept"], out
    assert out["blocks"] > 100 and 2 <= out["renders"] < out["updates"] / 20, out


def test_hostile_reply_runs_nothing_and_loads_nothing(page):
    b, url = page
    fresh(b)
    turn(b, "Say something nasty.", pieces(HOSTILE, 7))
    body = f"{ASSISTANT}[0].querySelector('.body')"
    b.js(f"[...{body}.querySelectorAll('a')].forEach((a) => a.click()); new Promise((r) => setTimeout(r, 300))")
    assert b.js("window.__pwned === undefined")
    assert b.js(f"{body}.querySelectorAll('script, iframe, svg, style, img, object, embed, link').length") == 0
    assert b.js(f"[...{body}.querySelectorAll('*')].flatMap(e => [...e.attributes].map(a => a.name))"
                ".filter(n => n.startsWith('on'))") == []
    hrefs = b.js(f"[...{body}.querySelectorAll('[href]')].map(e => e.getAttribute('href'))")
    assert not [h for h in hrefs if "javascript" in h.lower()], hrefs
    text = b.js(f"{body}.textContent")
    for shown in ["Before the payloads.", "After the payloads.", "this link", "that one", "a raw link",
                  "<script>window.__pwned='script'</script>", "<img src=x onerror=", "tracker",
                  "http://example.invalid/a.png"]:
        assert shown in text, shown
    assert requested_hosts(b) <= {urlsplit(url).netloc}
    assert b.js("window.__violations") == []  # the sanitizer stopped it all; the CSP had nothing left to block


def test_csp_blocks_what_a_sanitizer_would_miss(page):
    """Markup that skipped the sanitizer still cannot run inline script or fetch from another host."""
    b, url = page
    fresh(b)
    with urllib.request.urlopen(url + "/", timeout=10) as r:
        csp = {d.split()[0]: d.split()[1:] for d in r.headers["Content-Security-Policy"].split("; ")}
    with urllib.request.urlopen(url + "/static/chat.html", timeout=10) as r:  # the same page by its file's path
        assert r.headers["Content-Security-Policy"] == PAGE_CSP
    assert csp["default-src"] == ["'self'"] and csp["script-src"] == ["'self'"]
    assert csp["img-src"] == ["'self'", "data:", "blob:"] and csp["font-src"] == ["'self'"]
    b.js("document.getElementById('log').insertAdjacentHTML('beforeend', '<img src=\"x\" onerror=\"window.__pwned=1\">"
         "<img src=\"http://example.invalid/c.png\"><link rel=\"stylesheet\" href=\"http://example.invalid/d.css\">"
         "<a id=\"jl\" href=\"javascript:window.__pwned=2\">j</a>'); document.getElementById('jl').click();"
         " const s = document.createElement('script'); s.textContent = 'window.__pwned = 3'; document.body.append(s);"
         " new Promise((r) => setTimeout(r, 500))")
    assert b.js("window.__pwned === undefined")
    seen = b.js("window.__violations")
    for directive in ["img-src http://example.invalid/c.png", "style-src-elem http://example.invalid/d.css",
                      "script-src-attr inline", "script-src-elem inline"]:
        assert directive in seen, seen
    # Chromium lists a request the CSP stopped, as failed before it was sent
    blocked = {e["requestId"]: e.get("blockedReason") for e in b.drain("Network.loadingFailed")}
    remote = [e for e in b.drain("Network.requestWillBeSent") if "example.invalid" in e["request"]["url"]]
    assert remote and all(blocked.get(e["requestId"]) == "csp" for e in remote), (remote, blocked)


def test_json_mode(page):
    b, _ = page
    fresh(b)
    b.js("document.getElementById('json').checked = true; true")
    # the server itself: its constrained reply (random weights, whatever they prefer) is an object, shown indented
    request = turn(b, "Describe the photo as JSON.", None)
    assert request["response_format"] == {"type": "json_object"}
    answer = b.js("window.mlxChat.state.history[1].content")
    assert isinstance(json.loads(answer), dict), answer
    assert b.js(f"{ASSISTANT}[0].querySelector('.body pre.json code').textContent") == json.dumps(
        json.loads(answer), indent=2)
    fresh(b)
    b.js("document.getElementById('json').checked = true; true")
    reply = {"animal": "cat", "legs": 4, "colours": ["grey", "white"], "indoors": True}
    request = turn(b, "Describe the photo as JSON.", pieces(json.dumps(reply, separators=(",", ":")), 3))
    assert request["response_format"] == {"type": "json_object"}
    assert b.js(f"{ASSISTANT}[0].querySelector('.body pre.json code').textContent") == json.dumps(reply, indent=2)


def test_tool_calls_and_their_results(page):
    b, _ = page
    fresh(b)
    tools = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
             for name in ("get_weather", "get_time")]
    b.js(f"document.getElementById('tools').value = {json.dumps(json.dumps(tools))}; true")
    weather, time_args = '{"city": "Paris", "unit": "celsius"}', '{"tz":"Europe/Paris"}'
    deltas = [{"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}]
    deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": weather[i:i + 9]}}]}
               for i in range(0, len(weather), 9)]
    deltas += [{"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                "function": {"name": "get_time", "arguments": time_args[:8]}}]},
               {"tool_calls": [{"index": 1, "function": {"arguments": time_args[8:]}}]}]
    request = turn(b, "Weather and time in Paris?", deltas, finish="tool_calls")
    assert request["tools"] == tools
    calls = f"{ASSISTANT}[0].querySelectorAll('.tool-call')"
    names = b.js(f"[...{calls}].map(c => c.querySelector('.name').firstChild.textContent)")
    assert names == ["get_weather", "get_time"]
    assert b.js(f"[...{calls}].map(c => c.querySelector('pre').textContent)") == [
        json.dumps(json.loads(weather), indent=2), json.dumps(json.loads(time_args), indent=2)]
    assert "tool_calls" in b.js(f"{ASSISTANT}[0].querySelector('.stats').textContent")
    expected_call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": weather}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": time_args}}]}
    assert b.js("window.mlxChat.state.history")[-1] == expected_call

    # the next two messages are the calls' results; the request goes once both are in
    b.js("document.getElementById('input').value = '18 C, sunny'; document.getElementById('send').click(); true")
    assert not b.drain("Fetch.requestPaused")
    request = turn(b, "21:05", pieces("It is **18 C** and sunny in Paris at 21:05."), k=2)
    assert request["messages"][-3:] == [expected_call,
                                         {"role": "tool", "tool_call_id": "call_a", "content": "18 C, sunny"},
                                         {"role": "tool", "tool_call_id": "call_b", "content": "21:05"}]
    assert b.js(f"{ASSISTANT}[1].querySelector('.body strong').textContent") == "18 C"
    assert b.js("document.querySelectorAll('.msg.tool').length") == 2


def test_a_bad_tools_list_is_refused_on_the_page(page):
    b, _ = page
    fresh(b)
    b.js("document.getElementById('tools').value = '[{\"type\": '; document.getElementById('input').value = 'hi';"
         " document.getElementById('send').click(); true")
    b.wait(f"{ASSISTANT}.length === 1 && {ASSISTANT}[0].dataset.done === '1'")
    assert "the Tools field is not JSON" in b.js(f"{ASSISTANT}[0].querySelector('.error').textContent")
    assert not b.drain("Fetch.requestPaused")

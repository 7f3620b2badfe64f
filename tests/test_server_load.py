"""A bounded load test: 32 requests from 8 concurrent `openai` clients (text and images, some streamed, two aborted
midway). Every completed reply equals the reply the same request gets alone; nothing errors; the server is healthy
and idle afterwards."""

import concurrent.futures as cf
import json
import time
import urllib.request

import pytest

from builders import Case
from server_util import IMG1, IMG2, serving, user

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

REQUESTS = [[user("Hello there.")], [user("What is in the image?", IMG1)], [user("Describe it.", IMG2)],
            [user("Compare them.", IMG1, IMG2)], [user("Count to ten.")],
            [user("What is it?", IMG1), {"role": "assistant", "content": "A photo."}, user("Which colours?")],
            [{"role": "system", "content": "Be brief."}, user("Why is the sky blue?")], [user("Name a city.", IMG2)]]


def test_32_requests_from_8_clients(build_case):
    built = build_case(Case("smoke_qwen2"))
    with serving(built.original_dir, max_tokens=24, max_tiles=2, decode_concurrency=8) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        alone = [client.chat.completions.create(model="tiny", messages=m).choices[0].message.content for m in REQUESTS]

        def one(i):
            msgs, streamed, abort = REQUESTS[i % len(REQUESTS)], i % 3 == 0, i in (5, 20)
            if not (streamed or abort):
                return i, client.chat.completions.create(model="tiny", messages=msgs).choices[0].message.content
            stream = client.chat.completions.create(model="tiny", messages=msgs, stream=True, max_tokens=24)
            text = ""
            for n, c in enumerate(stream):
                text += (c.choices[0].delta.content or "") if c.choices else ""
                if abort and n == 2:
                    stream.close()
                    return i, None
            return i, text

        t = time.monotonic()
        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(32), timeout=300))
        assert time.monotonic() - t < 300
        done = [(i, text) for i, text in results if text is not None]
        assert len(done) == 30
        for i, text in done:
            assert text == alone[i % len(REQUESTS)], f"request {i}"
        deadline = time.monotonic() + 20
        while app.state.engine.inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        with urllib.request.urlopen(url + "/health") as r:
            health = json.load(r)
        assert health["status"] == "ok" and health["inflight"] == 0
        assert health["stats"]["max_batch"] >= 4  # requests really decoded together
        assert client.chat.completions.create(model="tiny", messages=REQUESTS[0]).choices[0].message.content == alone[0]

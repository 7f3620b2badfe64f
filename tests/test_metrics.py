"""`GET /metrics`: parsed by `prometheus_client`'s own parser, its counters move by what the requests did (the
usage the `openai` client got back: prompt and generated tokens, cache hits), requests are counted by route and
status, and every generation observed its time to first token."""

import re
import urllib.request
from pathlib import Path

import pytest

from builders import Case
from server_util import IMG1, serving, user

openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")


def scrape(url) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(text) for s in family.samples}


def families(url) -> set:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        # (prometheus_client's `_created` timestamps aside)
        return {f.name for f in parser.text_string_to_metric_families(r.read().decode())
                if not f.name.endswith("_created")}


def value(samples, name, **labels) -> float:
    return samples.get((f"mlx_internvl_{name}", tuple(sorted(labels.items()))), 0.0)


def test_counters_move_with_requests(build_case):
    built = build_case(Case("smoke_qwen2"))
    with serving(built.original_dir, max_tokens=6) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        before = scrape(url)
        ask = dict(model="tiny", messages=[user("What is it?", IMG1)], extra_body={"max_tiles": 1})
        usages = [client.chat.completions.create(**ask).usage for _ in range(2)]  # the second: the prompt cache
        ask["messages"].insert(0, {"role": "system", "content": "Be brief."})  # another prefix: the vision cache
        usages.append(client.chat.completions.create(**ask).usage)
        chunks = list(client.chat.completions.create(model="tiny", messages=[user("Hi")], stream=True,
                                                     stream_options={"include_usage": True}))
        usages.append(chunks[-1].usage)
        r = client.responses.create(model="tiny", input="Hello")
        client.responses.retrieve(r.id)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=[user("x")], temperature=5)
        after, served = scrape(url), families(url)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    chat = "/v1/chat/completions"
    assert moved("http_requests_total", endpoint=chat, status="200") == 4
    assert moved("http_requests_total", endpoint=chat, status="400") == 1
    assert moved("http_requests_total", endpoint="/v1/responses", status="200") == 1
    assert moved("http_requests_total", endpoint="/metrics", status="200") == 1  # the first scrape
    # by the route's template, not the raw path (one series, whatever the id)
    assert moved("http_requests_total", endpoint="/v1/responses/{response_id}", status="200") == 1
    prompt = sum(u.prompt_tokens for u in usages) + r.usage.input_tokens
    generated = sum(u.completion_tokens for u in usages) + r.usage.output_tokens
    assert moved("prompt_tokens_total") == prompt and moved("generated_tokens_total") == generated
    cached = [u.prompt_tokens_details.cached_tokens for u in usages] + [r.usage.input_tokens_details.cached_tokens]
    assert moved("prompt_cached_tokens_total") == sum(cached) > 0
    assert moved("prompt_cache_hits_total") == sum(c > 0 for c in cached) >= 1
    assert moved("vision_cache_misses_total") == 1 and moved("vision_cache_hits_total") == 1
    assert moved("generations_total") == 5
    assert moved("time_to_first_token_seconds_count") == 5
    assert moved("time_to_first_token_seconds_sum") > 0
    assert value(after, "queue_depth") == 0 and value(after, "requests_inflight") == 0
    # the serve page's table names what is served, no more, no less
    docs = (Path(__file__).parents[1] / "docs" / "serve.md").read_text()
    table = docs[docs.index("## Metrics"):docs.index("## Bad requests")]
    named = {re.sub(r"_total$", "", n) for n in re.findall(r"`(mlx_internvl_\w+)", table)}
    named |= {"mlx_internvl_vision_cache_misses"} if "`_misses_total`" in table else set()
    assert named == served, (named ^ served)

"""The server's caches stay within their byte budgets: the prompt cache (mlx-lm's `LRUPromptCache`) and the
image-feature cache evict by bytes, through real requests from the `openai` client; the budgets are options
(`--prompt-cache-bytes`, `--vision-cache-bytes`, sizes in mlx-lm's syntax) whose defaults are a share of the
machine's memory."""

import os

import mlx.core as mx
import pytest

from builders import Case
from server_util import IMG1, IMG2, serving, user

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from mlx_internvl.errors import UserError  # noqa: E402
from mlx_internvl.server.app import ServerConfig  # noqa: E402
from mlx_internvl.server.caches import FeatureCache  # noqa: E402

CASE = Case("smoke_qwen2")
PHYSICAL = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def ask(url, messages, **extra):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    return client.chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                          extra_body=dict(max_tiles=1, **extra))


def conversation(url, question):
    """A first turn: (its history with a second question, the first turn's prompt length)."""
    messages = [user(question)]
    r = ask(url, messages)
    messages += [{"role": "assistant", "content": r.choices[0].message.content}, user("And then?")]
    return messages, r.usage.prompt_tokens


def test_the_prompt_cache_evicts_by_bytes(build_case):
    built = build_case(CASE)
    with serving(built.original_dir) as (url, app):
        conversation(url, "Tell me about cats.")
        one = app.state.engine._prompts.nbytes  # the bytes one conversation's KV cache takes
        assert one > 0
    # Room for one conversation: a second one evicts the first, whose resent history is then prefilled again but
    # for the opening both share (system message, template), found in the second one's cache.
    with serving(built.original_dir, prompt_cache_bytes=str(int(one * 1.5))) as (url, app):
        first, n = conversation(url, "Tell me about cats.")
        conversation(url, "Tell me about dogs, at length.")
        prompts = app.state.engine._prompts
        assert len(prompts) == 1 and prompts.nbytes <= one * 1.5
        assert ask(url, first).usage.prompt_tokens_details.cached_tokens < n
    # Room for both, and for the running request's own cache, which counts too (as in mlx-lm's server).
    with serving(built.original_dir, prompt_cache_bytes=str(int(one * 6))) as (url, app):
        first, n = conversation(url, "Tell me about cats.")
        conversation(url, "Tell me about dogs, at length.")
        assert ask(url, first).usage.prompt_tokens_details.cached_tokens >= n


def test_the_vision_feature_cache_evicts_by_bytes(build_case):
    built = build_case(CASE)
    with serving(built.original_dir) as (url, app):
        ask(url, [user("What is it?", IMG1)])
        feats = app.state.engine._features
        one = feats.nbytes  # one image's features (one tile and the thumbnail)
        assert len(feats) == 1 and one > 0
    # The prompt cache off, so that every request needs its image's features.
    with serving(built.original_dir, vision_cache_bytes=str(int(one * 1.5)), prompt_cache_size=0) as (url, app):
        for image in (IMG1, IMG2, IMG1):
            ask(url, [user("What is it?", image)])
        stats = app.state.engine.stats
        assert stats["vision_misses"] == 3 and stats["vision_hits"] == 0  # IMG2 pushed IMG1 out
        assert app.state.engine._features.nbytes <= one * 1.5


def test_feature_cache_bounds():
    cache = FeatureCache(max_entries=3, max_bytes=2500)
    for i in range(3):
        cache.put(i, mx.zeros(250))  # 1000 bytes each
    assert cache.get(0) is None and cache.get(1) is not None and cache.nbytes == 2000
    cache.put(3, mx.zeros(250))  # 1 was used last, so 2 goes
    assert cache.get(2) is None and cache.get(1) is not None and len(cache) == 2
    cache.put(4, mx.zeros(1000))  # larger than the whole budget: not kept, nothing evicted for it
    assert cache.get(4) is None and len(cache) == 2


def test_budgets_default_to_a_share_of_memory_and_parse_like_mlx_lm(build_case):
    with serving(build_case(CASE).original_dir) as (_, app):
        engine = app.state.engine
        assert engine._prompts.max_bytes == int(PHYSICAL / 4)
        assert engine._features.max_bytes == int(PHYSICAL / 32)
    assert ServerConfig(model="m", prompt_cache_bytes="2G").prompt_cache_bytes == 2 * 10**9
    assert ServerConfig(model="m", vision_cache_bytes="512MB").vision_cache_bytes == 512 * 10**6
    for bad in ("lots", "-1G", "5X", ""):
        with pytest.raises(UserError, match="--prompt-cache-bytes: expected a size such as 8G"):
            ServerConfig(model="m", prompt_cache_bytes=bad)


def test_serve_refuses_a_bad_size_before_loading(capsys, tmp_path):
    from mlx_internvl.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(tmp_path / "missing"), "--vision-cache-bytes", "2 gigs"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("Error: --vision-cache-bytes: expected a size")

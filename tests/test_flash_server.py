"""The server's context-length check with the Flash router, as `generate` counts it: a request is refused before
any vision work only when it cannot fit even with every compressible tile compressed; once routed, its exact
length is checked and the reply limit (max_tokens, max_completion_tokens, max_output_tokens) is counted from it;
with the router off (--no-flash) the full-resolution length counts. Driven through the real `openai` client, on the
in-memory Flash model of tests/flash_model, vit_callss.py with a context just long enough for the routed prompt."""

import contextlib

import pytest
from flash_models import CASE, IMG1, flash_model, spy_vit, with_context

import mlx_internvl
from mlx_internvl.generate import stream_generate
from server_util import user

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

Q, MAX_TILES, ROOM = "What is it?", 4, 3


@pytest.fixture(scope="module")
def setup(build_case):
    built = build_case(CASE)
    base, processor = mlx_internvl.load(built.original_dir, dtype="float32")
    model = flash_model(base, 0.5, 0.0)  # the tiles above the request's median score are compressed
    full = len(processor(Q, images=[IMG1], max_tiles=MAX_TILES)["input_ids"][0])
    routed = next(stream_generate(model, processor, Q, [IMG1], max_tokens=1, max_tiles=MAX_TILES)).prompt_tokens
    short = with_context(built.original_dir, model, routed + ROOM)  # fits routed, not at full resolution
    assert full > routed + ROOM
    return model, short, full, routed


@contextlib.contextmanager
def served(model, processor, flash=None):
    from mlx_internvl.server.app import ServerConfig, create_app, running
    from mlx_internvl.server.engine import Engine

    engine = Engine(lambda: (model, processor), flash=flash)
    engine.start()
    app = create_app(ServerConfig(model="flash-tiny", model_name="tiny", max_tiles=MAX_TILES), engine=engine)
    with running(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120), app


@pytest.fixture
def vit_calls(monkeypatch):
    return spy_vit(monkeypatch)


def refused(call) -> str:
    with pytest.raises(openai.BadRequestError) as e:
        call()
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded", e.value.body
    return e.value.message


def test_a_prompt_that_fits_only_routed_is_served_with_the_routed_reply_budget(setup, vit_calls):
    model, short, full, routed = setup
    expected = [p.token for p in stream_generate(model, short, Q, [IMG1], max_tokens=50, max_tiles=MAX_TILES)]
    assert len(expected) == ROOM  # generate cuts the reply to what the context leaves after the routed prompt
    text = mlx_internvl.generate(model, short, Q, [IMG1], max_tokens=50, max_tiles=MAX_TILES)
    with served(model, short) as (client, app):
        r = client.chat.completions.create(model="tiny", messages=[user(Q, IMG1)])  # default max_tokens: 1024
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (routed, ROOM)
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == text
        r = client.chat.completions.create(model="tiny", messages=[user(Q, IMG1)], max_completion_tokens=2)
        assert r.usage.completion_tokens == 2  # a smaller limit asked for is kept
        out = client.responses.create(model="tiny", max_output_tokens=500, input=[
            {"role": "user", "content": [{"type": "input_image", "image_url": user(Q, IMG1)["content"][1]
                                          ["image_url"]["url"]}, {"type": "input_text", "text": Q}]}])
        assert (out.usage.input_tokens, out.usage.output_tokens) == (routed, ROOM) and out.status == "incomplete"

        # Routed, but the exact length does not fit: refused after routing, naming both lengths.
        longer = Q + " Tell me more."
        n = len(vit_calls)
        msg = refused(lambda: client.chat.completions.create(model="tiny", messages=[user(longer, IMG1)]))
        assert f"but the model's context is {routed + ROOM} tokens" in msg and "after the Flash router" in msg
        assert int(msg.split("the prompt is ")[1].split()[0]) > routed + ROOM
        assert app.state.engine.stats["vision_hits"] >= 1 and len(vit_calls) == n  # routed from the cached tiles

        # Three images cannot fit even with every compressible tile compressed: refused before any vision work.
        n, stats = len(vit_calls), dict(app.state.engine.stats)
        msg = refused(lambda: client.chat.completions.create(model="tiny", messages=[user(Q, IMG1, IMG1, IMG1)]))
        assert "even if the Flash router compresses every tile it can" in msg and f"{routed + ROOM} tokens" in msg
        assert len(vit_calls) == n and app.state.engine.stats == stats  # no ViT, nothing queued
        assert client.chat.completions.create(model="tiny", messages=[user(Q, IMG1)]).usage.prompt_tokens == routed


def test_full_resolution_counts_every_tile(setup, vit_calls):
    model, short, full, routed = setup
    with served(model, short, flash=False) as (client, _):
        msg = refused(lambda: client.chat.completions.create(model="tiny", messages=[user(Q, IMG1)]))
        assert "Flash router" not in msg and f"{5 * 256} image tokens for 5 tiles" in msg
        assert int(msg.split("the prompt is at least ")[1].split()[0]) <= full
    assert not vit_calls

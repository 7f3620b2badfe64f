"""The OpenAI-compatible server, driven by the real `openai` client on 127.0.0.1: response shapes are parsed by
the package's own types, greedy replies equal `generate()` / `ChatSession` token for token (and transformers'
`generate` for an image prompt), the prompt and image-feature caches are reused across turns, and the sampling
options, stop strings, cancellation and the busy answer behave."""

import json
import time
import urllib.request

import pytest

from builders import Case
from server_util import IMG1, IMG2, serving, user

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import mlx_internvl  # noqa: E402
from mlx_internvl.chat import ChatSession  # noqa: E402
from mlx_internvl.generate import stream_generate  # noqa: E402

N = 16


@pytest.fixture(scope="module")
def tiny(build_case):
    built = build_case(Case("smoke_qwen2"))
    model, processor = mlx_internvl.load(built.original_dir, dtype="float32")
    return built, model, processor


@pytest.fixture(scope="module")
def server(tiny):
    with serving(tiny[0].original_dir, max_tokens=N) as (url, app):
        yield url, app


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(model, processor, prompt, images=None, **kw):
    """(token texts, text, prompt length) of `stream_generate`, the end token left out as the server leaves it."""
    pieces = list(stream_generate(model, processor, prompt, images, max_tokens=N, **kw))
    toks = [p.token for p in pieces]
    if pieces[-1].finish_reason == "stop":
        toks = toks[:-1]
    text = "".join(p.text for p in pieces).strip()
    return [processor.tokenizer.decode([t]) for t in toks], text, pieces[-1].prompt_tokens


def tokens_of(choice):
    return [c.token for c in choice.logprobs.content]


def test_models_list_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    with urllib.request.urlopen(server[0] + "/health") as r:
        assert json.load(r)["status"] == "ok"


def test_text_reply_equals_generate_token_for_token(client, tiny):
    _, model, processor = tiny
    r = client.chat.completions.create(model="tiny", messages=[user("Say something.")], logprobs=True)
    toks, text, n_prompt = reference(model, processor, "Say something.")
    assert isinstance(r, openai.types.chat.ChatCompletion)
    assert tokens_of(r.choices[0]) == toks
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == len(toks) + (r.choices[0].finish_reason == "stop")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_equals_non_stream_with_usage(client):
    msgs = [user("Tell me a story.")]
    whole = client.chat.completions.create(model="tiny", messages=msgs)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1  # same prompt again


def test_data_image_with_max_tiles_equals_generate(client, tiny):
    _, model, processor = tiny
    r = client.chat.completions.create(model="tiny", messages=[user("What is in the image?", IMG1)],
                                       logprobs=True, extra_body={"max_tiles": 2})
    toks, text, n_prompt = reference(model, processor, "What is in the image?", [IMG1], max_tiles=2)
    assert tokens_of(r.choices[0]) == toks and r.choices[0].message.content == text
    assert r.usage.prompt_tokens == n_prompt
    # max_tiles changes the prompt (fewer image tokens), so it really reached the tiler
    r6 = client.chat.completions.create(model="tiny", messages=[user("What is in the image?", IMG1)],
                                        extra_body={"max_tiles": 6})
    assert r6.usage.prompt_tokens == reference(model, processor, "What is in the image?", [IMG1], max_tiles=6)[2]
    assert r6.usage.prompt_tokens > n_prompt


def test_two_images_equal_generate(client, tiny):
    _, model, processor = tiny
    r = client.chat.completions.create(model="tiny", messages=[user("Compare them.", IMG1, IMG2)], logprobs=True,
                                       extra_body={"max_tiles": 2})
    toks, text, n_prompt = reference(model, processor, "Compare them.", [IMG1, IMG2], max_tiles=2)
    assert tokens_of(r.choices[0]) == toks and r.usage.prompt_tokens == n_prompt


def test_image_reply_equals_transformers_generate(client, tiny):
    """Independent of our generate(): transformers' own greedy decoding of the same model and pixels."""
    from test_generate import torch_greedy

    built, _, processor = tiny
    r = client.chat.completions.create(model="tiny", messages=[user("Describe the picture.", IMG1)], logprobs=True,
                                       extra_body={"max_tiles": 4})
    inputs = processor("Describe the picture.", images=[IMG1], max_tiles=4)
    ref = torch_greedy(built, inputs, processor.eos_token_id, N)
    assert tokens_of(r.choices[0]) == [processor.tokenizer.decode([t]) for t in ref]


def test_multi_turn_equals_chat_session_and_reuses_caches(client, tiny, server):
    _, model, processor = tiny
    session = ChatSession(model, processor, max_tiles=2, max_tokens=N)
    turns = [("What is in the image?", [IMG1]), ("And in this one?", [IMG2]), ("Thanks. Which is brighter?", [])]
    messages, before, prev_total = [], dict(server[1].state.engine.stats), 0
    for i, (question, images) in enumerate(turns):
        expected = session.ask(question, images=images)
        messages.append(user(question, *images))
        r = client.chat.completions.create(model="tiny", messages=messages, extra_body={"max_tiles": 2})
        assert r.choices[0].message.content == expected, f"turn {i + 1}"
        if i:  # the whole history was resent; only the new turn was prefilled
            assert r.usage.prompt_tokens_details.cached_tokens > 0.8 * prev_total
        prev_total = r.usage.total_tokens
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
    stats = server[1].state.engine.stats
    assert stats["vision_misses"] - before["vision_misses"] <= 2  # each image encoded at most once


def test_system_message_and_upstream_prompt(client, tiny):
    _, model, processor = tiny
    msgs = [{"role": "system", "content": "You are terse."}, user("Hi")]
    r = client.chat.completions.create(model="tiny", messages=msgs, logprobs=True)
    toks, _, n_prompt = reference(model, processor, "Hi", system_message="You are terse.")
    assert tokens_of(r.choices[0]) == toks and r.usage.prompt_tokens == n_prompt


def test_stop_strings_cut_the_reply(client):
    full = client.chat.completions.create(model="tiny", messages=[user("Go on.")]).choices[0].message.content
    assert len(full) > 4
    stop = full[2:4]
    r = client.chat.completions.create(model="tiny", messages=[user("Go on.")], stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[:full.index(stop)].strip()
    streamed = client.chat.completions.create(model="tiny", messages=[user("Go on.")], stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r.choices[0].message.content


@pytest.fixture(scope="module")
def no_end(tiny):
    """A logit_bias that keeps the end tokens away, so that every reply runs to max_tokens."""
    return {str(i): -100.0 for i in tiny[2].stop_token_ids(True)}


def sampled(client, seed, no_end, temperature=1.0):
    r = client.chat.completions.create(model="tiny", messages=[user("Hello")], temperature=temperature, seed=seed,
                                       max_tokens=N, logprobs=True, logit_bias=no_end)
    return tokens_of(r.choices[0])


def test_temperature_samples_and_the_seed_fixes_the_draw(client, no_end):
    """Over N tokens of a tiny random model at temperature 1, two seeds and greedy decoding all differ (this fails
    if the sampler were argmax, or ignored the seed); the same seed gives the same tokens."""
    seven, eight = sampled(client, 7, no_end), sampled(client, 8, no_end)
    greedy = sampled(client, None, no_end, temperature=0.0)
    assert len(seven) == len(eight) == N  # the end token is biased away: every draw is compared
    assert seven != eight and seven != greedy and eight != greedy
    assert sampled(client, 7, no_end) == seven
    unseeded = [sampled(client, None, no_end) for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_seeded_reply_is_the_same_alone_and_in_a_busy_batch(tiny, no_end):
    """The seeded draw comes from the request's own key: other requests decoding in the same batch (greedy and
    sampled, started first so they are running) do not change it."""
    with serving(tiny[0].original_dir, max_tokens=N) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        alone = sampled(client, 7, no_end)
        others = [client.chat.completions.create(model="tiny", messages=[user(f"Story {i}")], max_tokens=400,
                                                 temperature=t, stream=True, logit_bias=no_end)
                  for i, t in enumerate([1.0, 0.0, 1.0])]
        for stream in others:
            next(iter(stream))  # each is in the batch now
        busy = sampled(client, 7, no_end)
        batch = app.state.engine.stats["max_batch"]
        for stream in others:
            stream.close()
    assert batch >= 4, batch  # the seeded request decoded next to the three others
    assert busy == alone


def test_logit_bias_and_penalties(client, tiny):
    _, _, processor = tiny
    target = processor.tokenizer.encode("Z")[0]
    biased = client.chat.completions.create(model="tiny", messages=[user("Hello")], max_tokens=5,
                                            logit_bias={str(target): 100.0})
    assert biased.choices[0].message.content == "ZZZZZ"
    def reply(**kw):
        r = client.chat.completions.create(model="tiny", messages=[user("Hello")], max_tokens=8, **kw)
        return r.choices[0].message.content

    plain = reply()  # each penalty alone changes the greedy reply (the prompt's tokens count as seen), so they act
    assert reply(presence_penalty=2.0) != plain and reply(frequency_penalty=2.0) != plain
    penalised = client.chat.completions.create(model="tiny", messages=[user("Hello")], max_tokens=5,
                                               logit_bias={str(target): 3.0}, presence_penalty=2.0,
                                               frequency_penalty=2.0, logprobs=True, top_logprobs=3)
    c = penalised.choices[0].logprobs.content
    assert len(c) == 5 and all(len(t.top_logprobs) == 3 for t in c)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in c)


def test_aborted_stream_frees_its_slot(server, tiny):
    url, app = server
    engine = app.state.engine
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="tiny", messages=[user("Long story please.")], max_tokens=400,
                                            stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 20
    while engine.inflight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.inflight == 0


def test_busy_server_answers_503_at_once(tiny):
    with serving(tiny[0].original_dir, decode_concurrency=1, max_queue=0, max_tokens=400) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(model="tiny", messages=[user("Go")], stream=True)
        next(iter(stream))  # now generating, holding the only slot
        t = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="tiny", messages=[user("Me too")])
        assert e.value.status_code == 503 and e.value.body["code"] == "server_busy"
        assert time.monotonic() - t < 5
        stream.close()


def test_api_key_and_unknown_model(tiny):
    with serving(tiny[0].original_dir, api_key="secret") as (url, _):
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="secret", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=[user("Hi")], max_tokens=2).choices
        with pytest.raises(openai.NotFoundError) as e:
            good.chat.completions.create(model="gpt-4o", messages=[user("Hi")])
        assert e.value.body["param"] == "model"
        with urllib.request.urlopen(url + "/") as r:  # the page itself needs no key
            assert b"<html" in r.read(200).lower()


def test_serve_command(capsys, tmp_path):
    from mlx_internvl.cli.main import main

    main(["serve", "--help"])
    assert "--allow-local-images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert e.value.code == 1 and last.startswith("Error:") and "missing" in last and "Traceback" not in err


def test_video_part_equals_generate(client, tiny):
    pytest.importorskip("av")
    from conftest import ASSETS

    _, model, processor = tiny
    video = ASSETS / "video" / "carphone_pristine.mp4"
    url = "data:video/mp4;base64," + __import__("base64").b64encode(video.read_bytes()).decode()
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What happens?"},
                                         {"type": "video_url", "video_url": {"url": url}}]}]
    r = client.chat.completions.create(model="tiny", messages=msgs, logprobs=True, extra_body={"num_frames": 3})
    toks, text, n_prompt = reference(model, processor, "What happens?", video=str(video), num_frames=3)
    assert tokens_of(r.choices[0]) == toks and r.usage.prompt_tokens == n_prompt

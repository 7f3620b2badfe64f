"""A request's cost is counted before it is paid: over-budget requests get a 4xx naming the limit and the numbers,
before any image is decoded, any video frame is decoded or any text is tokenized (proved with spies on those
functions, not with timings); within budget, tiles stay uint8 until the generation thread normalizes them."""

import base64

import numpy as np
import pytest
from conftest import ASSETS

import mlx_internvl.render as library_render
import mlx_internvl.server.render as server_render
import mlx_internvl.video as video_module
from builders import Case
from server_bad_requests import b64, png_header_only, send, small_png
from server_util import IMG1, data_url, serving

pytest.importorskip("fastapi")

CLIP = ASSETS / "video" / "carphone_pristine.mp4"  # 176x144, 120 frames


@pytest.fixture(scope="module")
def built(build_case):
    return build_case(Case("smoke_qwen2"))  # 56 px tiles of 4 tokens, a 512-token context


@pytest.fixture(scope="module")
def default_server(built):
    with serving(built.original_dir, api_key="test-key") as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def tight_server(built):
    with serving(built.original_dir, api_key="test-key", max_text_kb=1, max_request_tiles=1000,
                 max_video_megapixels=0.01) as (url, app):
        yield url, app


@pytest.fixture
def spies(monkeypatch):
    """Counts calls of everything that costs: fetching, decoding and tiling images, decoding video, tokenizing."""
    calls = {}

    def spy(owner, name):
        real = getattr(owner, name)

        def wrapper(*a, **kw):
            calls[name] = calls.get(name, 0) + 1
            return real(*a, **kw)
        monkeypatch.setattr(owner, name, wrapper)

    for name in ("fetch", "decode_image", "image_to_pixels", "image_to_tiles"):
        if hasattr(server_render, name):
            spy(server_render, name)
    spy(video_module, "_decode")
    spy(library_render.Renderer, "render")  # the one tokenizing renderer
    return calls


def chat(*parts, **extra) -> dict:
    content = [{"type": "text", "text": "Describe."}] + list(parts)
    return dict({"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}, **extra)


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def refused(url: str, body: dict, status: int, code: str):
    got, reply = send(url, body)
    assert got == status and reply["error"]["code"] == code, reply
    return reply["error"]["message"]


def test_images_over_the_tile_cap_are_refused_from_their_headers(default_server, spies):
    # Twelve 3584x2240 images at max_tiles 40: 41 tiles each, read from headers that hold no decodable pixels.
    bomb = b64(png_header_only(3584, 2240))
    msg = refused(default_server[0], chat(*[image(bomb)] * 12, max_tiles=40), 400, "too_many_tiles")
    assert "492 tiles" in msg and "128" in msg and "--max-request-tiles" in msg
    assert spies.get("fetch") == 12 and "decode_image" not in spies and "image_to_pixels" not in spies
    assert "render" not in spies


def test_images_over_the_context_are_refused_before_decoding(tight_server, spies):
    bomb = b64(png_header_only(3584, 2240))
    msg = refused(tight_server[0], chat(*[image(bomb)] * 12, max_tiles=40), 400, "context_length_exceeded")
    assert "1968 image tokens for 492 tiles" in msg and "512" in msg
    assert "decode_image" not in spies and "image_to_pixels" not in spies and "render" not in spies


def test_too_many_images_are_refused_before_any_is_fetched(default_server, spies):
    msg = refused(default_server[0], chat(*[image(b64(small_png()))] * 17), 400, "too_many_images")
    assert "17 images" in msg and "16" in msg and "--max-images" in msg
    assert not spies


def test_too_many_frames_are_refused_before_any_video_is_fetched(default_server, spies):
    junk = "data:video/mp4;base64," + base64.b64encode(b"not a video").decode()
    body = {"model": "tiny", "num_frames": 40, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "A"}, video(junk)]},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": [{"type": "text", "text": "C"}, video(junk)]}]}
    msg = refused(default_server[0], body, 400, "too_many_frames")
    assert "80 video frames" in msg and "64" in msg and "--max-frames" in msg
    assert not spies


def test_video_decoding_cost_is_counted_from_the_container(tight_server, spies):
    pytest.importorskip("av")
    url = "data:video/mp4;base64," + base64.b64encode(CLIP.read_bytes()).decode()
    msg = refused(tight_server[0], chat(video(url), num_frames=2), 400, "video_too_large")
    # 2 frames sampled of 120 are indices 29 and 89 (the model card's rule): 90 frames of 176x144 to decode
    assert "90 frames of 176x144" in msg and "--max-video-megapixels" in msg
    assert "_decode" not in spies and "render" not in spies


def test_text_past_the_lower_bound_is_refused_before_tokenizing(default_server, built, spies):
    # The tiny vocabulary's longest token is 13 bytes, so 40,000 bytes are at least 40000 / (3 * 13) tokens.
    msg = refused(default_server[0], {"model": "tiny", "messages": [{"role": "user", "content": "a" * 40_000}]},
                  400, "context_length_exceeded")
    assert "at least 1026 for 40" in msg and "512" in msg
    assert "render" not in spies


def test_text_over_the_byte_cap_is_refused_before_tokenizing(tight_server, spies):
    body = {"model": "tiny", "messages": [{"role": "system", "content": "s" * 600},
                                          {"role": "user", "content": "é" * 300}]}
    msg = refused(tight_server[0], body, 413, "text_too_long")
    assert "1200 bytes of text" in msg and "1024" in msg and "--max-text-kb" in msg
    assert "render" not in spies


def test_within_budget_tiles_stay_uint8_until_encoded(default_server):
    from mlx_internvl.server.protocol import parse_request

    app = default_server[1]
    processor = app.state.engine.processor
    renderer = app.state.server.renderer
    req = parse_request(__import__("json").dumps(chat(image(data_url(IMG1)), max_tiles=6)).encode(), 10**6)
    prompt = renderer.render(req)
    (spec,) = prompt.images
    assert spec.tiles.dtype == np.uint8 and spec.num_tiles == 7
    expected = processor.image_tiles([IMG1], max_tiles=6)[0]  # the library's float32 tiles
    np.testing.assert_array_equal(spec.pixel_values(), expected)
    assert spec.tiles is None  # let go once handed to the vision model
    if __import__("importlib").util.find_spec("av"):
        clip = "data:video/mp4;base64," + base64.b64encode(CLIP.read_bytes()).decode()
        frames = renderer.render(parse_request(__import__("json").dumps(chat(video(clip), num_frames=3)).encode(),
                                               10**6)).images
        assert [(f.tiles.dtype, f.tiles.shape) for f in frames] == [(np.uint8, (1, 56, 56, 3))] * 3


def test_within_budget_image_reply_equals_generate_token_for_token(default_server, tight_server, built):
    """Under the default limits and under tight ones, an image request inside them answers as `stream_generate`."""
    import mlx_internvl
    from mlx_internvl.generate import stream_generate

    model, processor = mlx_internvl.load(built.original_dir, dtype="float32")
    pieces = list(stream_generate(model, processor, "Describe.", [IMG1], max_tokens=8, max_tiles=2))
    toks = [p.token for p in pieces][:-1 if pieces[-1].finish_reason == "stop" else None]
    expected = [processor.tokenizer.decode([t]) for t in toks]
    assert len(expected) >= 4
    for url in (default_server[0], tight_server[0]):
        status, reply = send(url, chat(image(data_url(IMG1)), max_tiles=2, max_tokens=8, logprobs=True))
        assert status == 200, reply
        assert [c["token"] for c in reply["choices"][0]["logprobs"]["content"]] == expected
        assert reply["usage"]["prompt_tokens"] == pieces[-1].prompt_tokens


def test_serve_options_reach_the_server_config(monkeypatch, tmp_path):
    import mlx_internvl.cli.serve_cmd as serve_cmd
    from mlx_internvl.cli.main import main
    from mlx_internvl.server.app import ServerConfig

    seen = {}
    monkeypatch.setattr(serve_cmd, "serve", lambda model, group=None, **options: seen.update(options))
    main(["serve", "--model", str(tmp_path), "--max-images", "3", "--max-frames", "5", "--max-request-tiles", "7",
          "--max-text-kb", "2.5", "--max-video-megapixels", "0.5"])
    cfg = ServerConfig(model="m", **seen)
    assert (cfg.max_images, cfg.max_frames, cfg.max_request_tiles, cfg.max_text_kb, cfg.max_video_megapixels) == (
        3, 5, 7, 2.5, 0.5)
    defaults = ServerConfig(model="m")
    assert (defaults.max_images, defaults.max_frames, defaults.max_request_tiles, defaults.max_text_kb,
            defaults.max_video_megapixels) == (16, 64, 128, 1024.0, 4000.0)


def test_the_text_bound_never_exceeds_the_real_token_count():
    """`bytes / (3 L)` is a lower bound on the tokens transformers' own Qwen2.5 tokenizer (NFC-normalizing
    byte-level BPE) makes, for whitespace runs, long repeats, CJK, emoji and decomposed Hangul that NFC composes."""
    import unicodedata

    from transformers import AutoTokenizer

    from mlx_internvl.server.budget import SHRINK, longest_token_bytes, text_bytes

    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizers" / "qwen2_5"))
    per_token = SHRINK * longest_token_bytes(tok)
    assert longest_token_bytes(tok) >= max(len(tok.decode([i]).encode()) for i in range(0, 151643, 97))
    texts = [" " * 5000, "\n" * 3000, "-" * 4000, "a" * 9000, "数据" * 2000, "🙂" * 1000, "<|im_start|>" * 300,
             unicodedata.normalize("NFD", "각한글" * 1500), unicodedata.normalize("NFD", "ΐǖ" * 2000)]
    for text in texts:
        assert len(tok.encode(text)) >= -(-text_bytes(text) // per_token) >= 1, text[:10]


def test_a_video_without_a_declared_frame_size_is_refused():
    from types import SimpleNamespace

    from mlx_internvl.server.budget import Budget, Limits
    from mlx_internvl.server.protocol import APIError

    processor = SimpleNamespace(context_length=512, config=SimpleNamespace(num_image_token=4),
                                tokenizer=SimpleNamespace(get_vocab=lambda: {"ab": 0}))
    budget = Budget(Limits(), processor)
    assert budget.video("v", 176, 144, 90, 0, 10**8) == 90 * 176 * 144
    with pytest.raises(APIError, match="does not say its frame size") as e:
        budget.video("v", 0, 0, 90, 0, 10**8)
    assert e.value.status == 400 and e.value.code == "invalid_video"

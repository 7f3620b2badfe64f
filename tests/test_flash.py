"""InternVL3.5-Flash (the Visual Resolution Router) against the Flash repos' own modeling code (loaded from
$MLX_INTERNVL_UPSTREAM_FLASH: see tests/flash_oracle.py; skipped without it).

A tiny case at 448 px (1024 patches and 256 tokens per tile, as upstream's compression hard-codes) gets seeded
Flash modules from upstream's own classes; the thresholds make the router compress some tiles, keep others for the
relative threshold, and keep others again for the absolute one. Compared per request: per-tile decisions, the
compressed prompt ids, the merged embeddings and logits, greedy tokens and `chat()` replies — one image, several
images with `num_patches_list`, two turns, text only; and the full-resolution switch against `generate_normal`.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ASSETS
from flash_oracle import Spy, upstream_flash, write_flash_checkpoint

import mlx_internvl
from builders import Case
from mlx_internvl.chat import ChatSession
from mlx_internvl.errors import UserError
from mlx_internvl.flash import compress_ids, route
from mlx_internvl.generate import batch_generate, generate, stream_generate

CASE = Case("flash_qwen2", image_size=448, seed=5, extra_text={"max_position_embeddings": 8192})
RELATIVE, ABSOLUTE = 0.25, 0.76  # with these weights: some tiles pass both, some fail each one
IMAGES = [str(ASSETS / "images" / "image1.jpg"), str(ASSETS / "images" / "chelsea.png")]
MAX_TILES, MAX_NEW = 4, 6
EMBED_TOL, LOGITS_TOL = 1e-4, 1e-4  # tests/test_parity.py's fp32 tolerances


@pytest.fixture(scope="module")
def setup(build_case, tmp_path_factory):
    from transformers import AutoTokenizer

    built = build_case(CASE)
    up = upstream_flash(built, RELATIVE, ABSOLUTE)
    path = write_flash_checkpoint(built, up, tmp_path_factory.mktemp("flash") / "ckpt")
    model, processor = mlx_internvl.load(path, dtype="float32")
    return up, model, processor, AutoTokenizer.from_pretrained(str(path)), path


def torch_pixels(inputs):
    import torch

    return torch.from_numpy(np.array(inputs["pixel_values"])).permute(0, 3, 1, 2).contiguous()


def upstream_chat(up, tok, question, inputs, history=None):
    spy = Spy(up)
    pv = None if inputs["pixel_values"] is None else torch_pixels(inputs)
    patches = list(inputs["num_tiles"]) if pv is not None else None
    reply, history = up.chat(tok, pv, question, dict(max_new_tokens=MAX_NEW, do_sample=False), history=history,
                             return_history=True, num_patches_list=patches)
    return spy, reply, history


def our_tokens(model, processor, question, images, **kw):
    out = list(stream_generate(model, processor, question, images, max_tokens=MAX_NEW, max_tiles=MAX_TILES, **kw))
    stop = processor.stop_token_ids(False, ())
    return [r.token for r in out if r.token not in stop], "".join(r.text for r in out).strip(), out[-1]


def upstream_new_tokens(spy, tok):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for t in spy.tokens:
        if t == end:
            break
        out.append(t)
    return out


@pytest.mark.parametrize("question,images", [
    ("Describe the image.", IMAGES[:1]),
    ("Image-1: <image>\nImage-2: <image>\nCompare them.", IMAGES),
], ids=["one_image", "two_images"])
def test_flash_matches_upstream(setup, question, images):
    import torch

    up, model, processor, tok, _ = setup
    inputs = processor(question, images=images, max_tiles=MAX_TILES)
    spy, reply, _ = upstream_chat(up, tok, question, inputs)
    ref = spy.calls[0]
    enc = model.encode_request(inputs["input_ids"][0].tolist(), inputs["pixel_values"])
    np.testing.assert_array_equal(enc.compress, ref["decisions"])
    assert enc.compress.any() and not enc.compress.all()
    assert enc.ids == ref["ids"].tolist()
    assert len(enc.ids) < inputs["input_ids"].shape[1]

    ours_embeds = model.get_input_embeddings(mx.array(enc.ids)[None], image_features=enc.features)[0]
    assert np.abs(np.array(ours_embeds) - ref["embeds"].numpy()).max() < EMBED_TOL
    with torch.no_grad():
        ref_logits = up.language_model(inputs_embeds=ref["embeds"][None]).logits[0].numpy()
    ours_logits = np.array(model(mx.array(enc.ids)[None], image_features=enc.features)[0])
    # Over ~1300 positions fp32 sums drift in the backbone itself (the same embeddings through transformers'
    # Qwen2 differ by ~2e-4 at the far end), so all positions are held to the relative error, the last to the abs.
    err = np.abs(ours_logits - ref_logits)
    assert err.max() / np.abs(ref_logits).max() < LOGITS_TOL and err[-1].max() < LOGITS_TOL

    tokens, text, last = our_tokens(model, processor, question, images)
    assert tokens == upstream_new_tokens(spy, tok)
    assert text == reply
    assert last.router.startswith(f"Flash router: {int(enc.compress.sum())}/{len(enc.compress)} tiles compressed")


def test_router_stages_match_upstream(setup):
    """Stage by stage (upstream `extract_feature_flash`): the router's p0 per tile, mlp2's 64 and mlp1's 256 rows."""
    import torch

    up, model, processor, _, _ = setup
    inputs = processor("Image-1: <image>\nImage-2: <image>\nx", images=IMAGES, max_tiles=MAX_TILES)
    pv = torch_pixels(inputs)
    with torch.no_grad():
        low, full, gate = up.extract_feature_flash(pv, torch.ones(pv.shape[0], dtype=torch.int64))
    ours = model.flash_tiles(inputs["pixel_values"])
    assert np.abs(ours.p0 - gate[:, 0].numpy()).max() < 1e-5
    assert ours.low.shape == (pv.shape[0], 64, full.shape[-1])
    assert np.abs(np.array(ours.low) - low.numpy()).max() < EMBED_TOL
    assert np.abs(np.array(ours.full) - full.numpy()).max() < EMBED_TOL


def test_both_thresholds_bite(setup):
    """The fixture's thresholds exercise each condition: a tile above the quantile kept by the absolute one."""
    _, model, processor, _, _ = setup
    inputs = processor("Image-1: <image>\nImage-2: <image>\nx", images=IMAGES, max_tiles=MAX_TILES)
    p0 = model.flash_tiles(inputs["pixel_values"]).p0
    above = p0 > np.quantile(p0, RELATIVE)
    assert (above & (p0 < ABSOLUTE)).any() and (above & (p0 >= ABSOLUTE)).any() and (~above).any()


def test_multi_turn_matches_upstream(setup):
    up, model, processor, tok, _ = setup
    q1, q2 = "Image-1: <image>\nImage-2: <image>\nWhat is shown?", "And then?"
    inputs = processor(q1, images=IMAGES, max_tiles=MAX_TILES)
    _, r1, history = upstream_chat(up, tok, q1, inputs)
    spy2, r2, _ = upstream_chat(up, tok, q2, inputs, history=history)
    session = ChatSession(model, processor, max_tokens=MAX_NEW, max_tiles=MAX_TILES)
    assert session.ask(q1, images=IMAGES) == r1
    assert session.ask(q2) == r2
    assert session.router.startswith(f"Flash router: {int(spy2.calls[0]['decisions'].sum())}/")


def test_an_image_added_later_reroutes_the_earlier_one_as_upstream(setup):
    """Turn 2 adds an image next to which the router decides one of turn 1's tiles otherwise (the quantile spans all
    the conversation's tiles): the session's kept KV cache must not serve that tile's old rows; both replies are
    upstream's `chat(history=...)`."""
    up, model, processor, tok, _ = setup
    first, later = IMAGES[1], IMAGES[0]
    one = processor("What is it?", images=[first], max_tiles=MAX_TILES)
    both = processor("And this one?", images=[first, later], max_tiles=MAX_TILES)
    n1 = one["num_tiles"][0]

    def decisions(inputs):
        return model.encode_request(inputs["input_ids"][0].tolist(), inputs["pixel_values"]).compress

    assert not np.array_equal(decisions(one), decisions(both)[:n1])  # the case in point
    _, r1, history = upstream_chat(up, tok, "<image>\nWhat is it?", one)
    _, r2, _ = upstream_chat(up, tok, "Image-2: <image>\nAnd this one?", both, history=history)
    session = ChatSession(model, processor, max_tokens=MAX_NEW, max_tiles=MAX_TILES)
    assert session.ask("What is it?", images=[first]) == r1
    assert session.ask("And this one?", images=[later]) == r2


def test_text_only_matches_upstream(setup):
    up, model, processor, tok, _ = setup
    inputs = processor("Hello there", images=None)
    _, reply, _ = upstream_chat(up, tok, "Hello there", inputs)
    assert generate(model, processor, "Hello there", max_tokens=MAX_NEW) == reply


def test_video_frames_are_routed_as_upstream(setup):
    """Video frames are one tile each; the router decides over the frames (upstream: chat with one patch each)."""
    pytest.importorskip("av")
    from mlx_internvl.processing import add_video_placeholders

    up, model, processor, tok, _ = setup
    clip = str(ASSETS / "video" / "carphone_pristine.mp4")
    inputs = processor("What happens?", video=clip, num_frames=6)
    spy, reply, _ = upstream_chat(up, tok, add_video_placeholders("What happens?", 6), inputs)
    enc = model.encode_request(inputs["input_ids"][0].tolist(), inputs["pixel_values"])
    np.testing.assert_array_equal(enc.compress, spy.calls[0]["decisions"])
    assert enc.compress.any() and enc.ids == spy.calls[0]["ids"].tolist()
    assert generate(model, processor, "What happens?", video=clip, num_frames=6, max_tokens=MAX_NEW) == reply


def test_full_resolution_switch_matches_generate_normal(setup):
    """`flash=False` is upstream's `generate_normal`: every tile through mlp1, nothing dropped."""
    up, model, processor, tok, _ = setup
    question = "Image-1: <image>\nImage-2: <image>\nCompare them."
    inputs = processor(question, images=IMAGES, max_tiles=MAX_TILES)
    up.flash_mode = False
    try:
        spy, reply, _ = upstream_chat(up, tok, question, inputs)
    finally:
        up.flash_mode = True
    assert not spy.calls  # upstream's compression never ran
    tokens, text, last = our_tokens(model, processor, question, IMAGES, flash=False)
    assert text == reply and last.router is None
    assert last.prompt_tokens == inputs["input_ids"].shape[1]


def test_batch_routes_each_request(setup):
    up, model, processor, tok, _ = setup
    prompts = ["Describe the image.", "Image-1: <image>\nImage-2: <image>\nCompare them.", "Hello there"]
    images = [IMAGES[:1], IMAGES, None]
    out = batch_generate(model, processor, prompts, images, max_tokens=MAX_NEW, max_tiles=MAX_TILES)
    for text, q, ims in zip(out.texts, prompts, images):
        inputs = processor(q, images=ims, max_tiles=MAX_TILES)
        assert text == upstream_chat(up, tok, q, inputs)[1]


def test_speculative_decoding_with_the_router(setup):
    """A self-draft shares the target's ViT, so it takes the routed features; the greedy reply stays upstream's.
    A draft with a vision tower of its own is refused while the router is on."""
    from mlx_internvl.speculative import Draft

    up, model, processor, tok, path = setup
    question = "Image-1: <image>\nImage-2: <image>\nCompare them."
    reply = upstream_chat(up, tok, question, processor(question, images=IMAGES, max_tiles=MAX_TILES))[1]
    draft = Draft.self_draft(model, 8, num_draft_tokens=2)
    assert generate(model, processor, question, IMAGES, max_tokens=MAX_NEW, max_tiles=MAX_TILES, draft=draft) == reply
    session = ChatSession(model, processor, max_tokens=MAX_NEW, max_tiles=MAX_TILES, draft=draft)
    assert session.ask(question, images=IMAGES) == reply
    other, other_proc = mlx_internvl.load(path, dtype="float32")
    own = Draft.from_model(model, processor, other, other_proc)
    with pytest.raises(UserError, match="share the target's vision tower"):
        generate(model, processor, question, IMAGES, max_tokens=MAX_NEW, max_tiles=MAX_TILES, draft=own)
    assert generate(model, processor, "Hello there", max_tokens=MAX_NEW, draft=own, flash=False) == upstream_chat(
        up, tok, "Hello there", processor("Hello there"))[1]


def test_config_switch_and_errors(setup, tmp_path, build_case):
    _, model, _, _, path = setup
    cfg = json.loads((path / "config.json").read_text())
    off = tmp_path / "off"
    off.mkdir()
    for f in path.iterdir():
        (off / f.name).write_bytes(f.read_bytes())
    (off / "config.json").write_text(json.dumps(dict(cfg, flash_mode=False)))
    m_off, _ = mlx_internvl.load(off, dtype="float32")
    assert not m_off.use_flash() and m_off.use_flash(True)
    (off / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "flash_absolute_threshold"}))
    with pytest.raises(UserError, match="flash_absolute_threshold"):
        mlx_internvl.load(off, dtype="float32")
    plain, _ = mlx_internvl.load(build_case(CASE).original_dir, dtype="float32")
    with pytest.raises(UserError, match="InternVL3.5-Flash checkpoint"):
        plain.use_flash(True)


def test_convert_and_export_keep_the_router(setup, tmp_path):
    """convert -> MLX dir -> export (original layout) gives back the Flash tensors bit for bit and the config keys;
    the converted model routes as the source does. The -hf layout has no router and is refused."""
    from safetensors.numpy import load_file

    from mlx_internvl.convert import convert
    from mlx_internvl.convert.export import export_hf

    _, model, processor, _, path = setup
    mlx_dir = convert(path, tmp_path / "mlx")
    out = export_hf(mlx_dir, tmp_path / "export", layout="original")
    src, back = load_file(str(path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    flash_keys = [k for k in src if k.startswith(("mlp2.", "gating.", "pooling_before_gating."))]
    assert len(flash_keys) == 61
    for k in flash_keys:
        assert np.array_equal(src[k], back[k]), k
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["flash_mode"], cfg["flash_relative_threshold"], cfg["flash_absolute_threshold"]) == (
        True, RELATIVE, ABSOLUTE)
    converted, _ = mlx_internvl.load(mlx_dir, dtype="float32")
    inputs = processor("Image-1: <image>\nImage-2: <image>\nx", images=IMAGES, max_tiles=MAX_TILES)
    ids = inputs["input_ids"][0].tolist()
    ours = model.encode_request(ids, inputs["pixel_values"])
    theirs = converted.encode_request(ids, inputs["pixel_values"])
    assert theirs.ids == ours.ids and np.array_equal(theirs.compress, ours.compress)
    with pytest.raises(UserError, match="no Flash router"):
        export_hf(mlx_dir, tmp_path / "hf", layout="hf")


def test_cli_flash_switch_and_verbose_decisions(setup):
    """`generate --verbose` prints the router's per-tile decisions; `--no-flash` runs full resolution; both replies
    are upstream's (generate_flash / generate_normal)."""
    from test_cli_generate import run

    up, model, processor, tok, path = setup
    question = "Image-1: <image>\nImage-2: <image>\nCompare them."
    inputs = processor(question, images=IMAGES, max_tiles=MAX_TILES)
    spy, reply, _ = upstream_chat(up, tok, question, inputs)
    args = ["generate", "--model", path, "--image", *IMAGES, "--prompt", question, "--max-tokens", MAX_NEW,
            "--max-tiles", MAX_TILES]
    proc = run(args + ["--verbose"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == reply
    decisions = spy.calls[0]["decisions"]
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("Flash router:"))
    assert line.startswith(f"Flash router: {int(decisions.sum())}/{len(decisions)} tiles compressed")
    assert [w.split("(")[0] for w in line.split(": ")[-1].split()] == ["low" if d else "full" for d in decisions]
    up.flash_mode = False
    try:
        normal = upstream_chat(up, tok, question, inputs)[1]
    finally:
        up.flash_mode = True
    proc = run(args + ["--no-flash", "--verbose"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == normal and "Flash router:" not in proc.stderr


def test_server_routes_and_keys_its_caches_on_the_decisions(setup):
    """The server's replies are upstream's; a repeated request reuses its prompt cache and vision cache; a request
    that shares the first image but routes it differently (the quantile spans other tiles) does not reuse the KV of
    that image's tokens, and still answers as upstream does."""
    openai = pytest.importorskip("openai")
    from server_util import serving, user

    up, model, processor, tok, path = setup
    cat, other = IMAGES[1], str(ASSETS / "images" / "image2.jpg")
    q = "Image-1: <image>\nImage-2: <image>\nCompare them."
    pair_a, pair_b = [cat, cat], [cat, other]
    first_tiles = processor(q, images=pair_a, max_tiles=MAX_TILES)["num_tiles"][0]

    def first_image_decisions(images):
        inputs = processor(q, images=images, max_tiles=MAX_TILES)
        return model.encode_request(inputs["input_ids"][0].tolist(), inputs["pixel_values"]).compress[:first_tiles]

    assert not np.array_equal(first_image_decisions(pair_a), first_image_decisions(pair_b))  # the case in point
    with serving(path, max_tiles=MAX_TILES, max_tokens=MAX_NEW) as (url, app):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for images, again in ((pair_a, True), (pair_b, False)):
            inputs = processor(q, images=images, max_tiles=MAX_TILES)
            spy, reply, _ = upstream_chat(up, tok, q, inputs)
            r = client.chat.completions.create(model="tiny", messages=[user("Compare them.", *map(Path, images))])
            assert r.choices[0].message.content == reply
            assert r.usage.prompt_tokens == len(spy.calls[0]["ids"])
            if again:
                r2 = client.chat.completions.create(model="tiny", messages=[user("Compare them.",
                                                                                  *map(Path, images))])
                assert r2.choices[0].message.content == reply
                assert r2.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1
        stats = app.state.engine.stats
        assert stats["vision_misses"] == 2 and stats["vision_hits"] >= 4  # cat once, image2 once


def test_lora_leaves_the_router_and_mlp2_frozen(setup):
    """LoRA adapts the LLM (and mlp1 when asked); the router and mlp2 stay frozen, even with the projector trained."""
    from mlx_internvl.adapters import LoraConfig, apply_lora, trainable_weights

    _, _, _, _, path = setup
    model, _ = mlx_internvl.load(path, dtype="float32")
    apply_lora(model, LoraConfig(rank=4, train_projector="full"))
    names = list(trainable_weights(model))
    assert any(n.startswith("language_model.") for n in names) and any(n.startswith("mlp1.") for n in names)
    assert not [n for n in names if n.startswith(("mlp2.", "gating.", "pooling_before_gating."))]


def test_route_and_compress_ids_pure():
    """`torch.quantile`'s linear rule, strict `>` against it, `>=` against the absolute threshold."""
    import torch

    p0 = np.array([0.2, 0.9, 0.5, 0.7, 0.7], dtype=np.float32)
    for rel, ab in [(0.5, 0.0), (0.25, 0.7), (0.0, 0.6), (1.0, 0.0), (0.3, 0.75)]:
        t = torch.from_numpy(p0)
        ref = (t > torch.quantile(t, rel)) & (t >= ab)
        np.testing.assert_array_equal(route(p0, rel, ab), ref.numpy())
    assert not route(np.array([0.99], dtype=np.float32), 0.1, 0.0).any()  # one tile is its own quantile
    ids = [1, 7, 7, 7, 7, 2, 7, 7, 7, 7, 3]
    assert compress_ids(ids, 7, [True, False, False, True], per_tile=2, kept=1) == [1, 7, 7, 7, 2, 7, 7, 7, 3]
    with pytest.raises(ValueError, match="image tokens"):
        compress_ids(ids, 7, [True], per_tile=2, kept=1)

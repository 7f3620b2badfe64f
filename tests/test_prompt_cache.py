"""Prompt-cache files: a request that extends a cached prompt gives the same logits and tokens as computing it from
scratch (generate, ChatSession, with a draft too); a file made by another model, revision, dtype, quantization or
adapter, or a request that does not extend it, is refused with a `UserError`; files are written atomically."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest
from conftest import ASSETS
from mlx_lm.models.cache import RotatingKVCache
from test_parity import GPT_OSS  # sliding-window layers

import mlx_internvl
from builders import Case
from mlx_internvl.chat import ChatSession
from mlx_internvl.errors import UserError
from mlx_internvl.generate import stream_generate
from mlx_internvl.prompt_cache import PromptCacheFile, image_hashes, save_prompt_cache_file
from mlx_internvl.speculative import Draft

IMG1, IMG2 = ASSETS / "images" / "image1.jpg", ASSETS / "images" / "chelsea.png"
QWEN2 = Case("smoke_qwen2")
INTERNLM2 = Case("m_internlm2", text="internlm2", template="internlm2-chat")  # BOS-prefixed tokenizer


@pytest.fixture(scope="module")
def qwen2(build_case):
    return mlx_internvl.load(build_case(QWEN2).original_dir, dtype="float32")


def tokens(model, processor, prompt, images, **kw):
    pieces = list(stream_generate(model, processor, prompt, images, max_tokens=16, max_tiles=2, **kw))
    toks = [p.token for p in pieces]
    return (toks[:-1] if pieces[-1].finish_reason == "stop" else toks), pieces[-1]


@pytest.mark.parametrize("case", [QWEN2, INTERNLM2, GPT_OSS], ids=["qwen2", "internlm2", "gpt_oss"])
def test_round_trip_equals_recomputing(build_case, tmp_path, case):
    model, processor = mlx_internvl.load(build_case(case).original_dir, dtype="float32")
    f = tmp_path / "img.safetensors"
    pcf = save_prompt_cache_file(model, processor, f, "", [IMG1, IMG2], max_tiles=2)
    assert f.exists() and not [p for p in os.listdir(tmp_path) if p != f.name]  # no temporary file left
    _check_cache_classes(model, pcf)
    for question in ("What is different?", "Describe both pictures in detail, please."):
        inputs = processor(question, images=[IMG1, IMG2], max_tiles=2)
        ids = inputs["input_ids"][0].tolist()
        n = pcf.prefix_length(ids, image_hashes(inputs["pixel_values"], inputs["num_tiles"]))
        assert n == len(pcf.token_ids) and ids[:n] == pcf.token_ids and n < len(ids)
        # Logits of the whole request: from scratch vs the loaded cache + the rest of the prompt.
        full = model(inputs["input_ids"], pixel_values=inputs["pixel_values"])[0, -1]
        cache = PromptCacheFile.load(f, model).fresh_cache()
        rest = model(mx.array([ids[n:]]), cache=cache)[0, -1]
        assert float(mx.abs(full - rest).max()) < 1e-4
        plain, _ = tokens(model, processor, question, [IMG1, IMG2])
        cached, last = tokens(model, processor, question, [IMG1, IMG2], prompt_cache_file=f)
        assert cached == plain
        assert last.prompt_tokens == len(ids) - n  # only the new part ran
        # A loaded file serves many requests and is left unchanged by them.
        assert tokens(model, processor, question, [IMG1, IMG2], prompt_cache_file=pcf)[0] == plain


def _check_cache_classes(model, pcf):
    """Each layer's cache is of the class mlx-lm's model makes for it (GPT-OSS's sliding layers: a RotatingKVCache
    of the window), in the file, and after the rest of a request and decode steps past the window."""
    made = model.make_cache()
    assert [type(c) for c in pcf.cache] == [type(c) for c in made]
    rotating = [c for c in pcf.cache if isinstance(c, RotatingKVCache)]
    assert all(c.keys.shape[2] == c.max_size < len(pcf.token_ids) for c in rotating)  # the file holds the window
    cache = pcf.fresh_cache()
    model(mx.array([[5, 6, 7]]), cache=cache)
    for _ in range(10):
        model(mx.array([[5]]), cache=cache)
    for c, m in zip(cache, made):
        assert type(c) is type(m)
        if isinstance(m, RotatingKVCache):
            assert c.keys.shape[2] == m.max_size  # rotated, not grown
    assert all(c.offset == len(pcf.token_ids) for c in pcf.cache)  # the file's caches are left as they were


def test_cached_opening_text_and_a_draft(qwen2, tmp_path):
    model, processor = qwen2
    f = tmp_path / "open.safetensors"
    save_prompt_cache_file(model, processor, f, "Look carefully.", [IMG1], max_tiles=2)
    q = "Look carefully. What is it?"
    plain, _ = tokens(model, processor, q, [IMG1])
    assert tokens(model, processor, q, [IMG1], prompt_cache_file=f)[0] == plain
    for draft in (Draft.self_draft(model, bits=8, group_size=32), Draft.from_model(model, processor, *qwen2)):
        assert tokens(model, processor, q, [IMG1], prompt_cache_file=f, draft=draft)[0] == plain


def test_chat_session_from_a_file_equals_plain_chat(qwen2, tmp_path):
    model, processor = qwen2
    f = tmp_path / "chat.safetensors"
    save_prompt_cache_file(model, processor, f, "", [IMG1], max_tiles=2)
    turns = [("What is in the image?", [IMG1]), ("And in this one?", [IMG2]), ("Thanks.", [])]
    plain = ChatSession(model, processor, max_tiles=2, max_tokens=10)
    answers = [plain.ask(q, images=i) for q, i in turns]
    for draft in (None, Draft.self_draft(model, bits=8, group_size=32)):
        s = ChatSession(model, processor, max_tiles=2, max_tokens=10, prompt_cache_file=f, draft=draft)
        first = list(s.stream("What is in the image?", images=[IMG1]))
        assert first[-1].prompt_tokens < 40  # the image came from the file
        assert "".join(r.text for r in first).strip() == answers[0]
        assert [s.ask(q, images=i) for q, i in turns[1:]] == answers[1:]
        s.clear()  # the next first turn starts from the file again
        assert s.ask("What is in the image?", images=[IMG1]) == answers[0]
    s = ChatSession(model, processor, max_tiles=2, prompt_cache_file=f)
    with pytest.raises(UserError, match="does not extend"):
        s.ask("Hello")  # no image: the cached prompt starts with one
    assert s.history == []


def test_requests_that_do_not_extend_the_prefix_are_refused(qwen2, tmp_path):
    model, processor = qwen2
    f = tmp_path / "p.safetensors"
    save_prompt_cache_file(model, processor, f, "Look carefully.", [IMG1], max_tiles=2)
    cases = [
        (dict(prompt="What is it?", images=[IMG1]), "departs at token"),  # another opening text
        (dict(prompt="Look carefully. X", images=[IMG1], system_message="Be brief."), "departs"),  # system message
        (dict(prompt="Look carefully. X", images=[IMG1], max_tiles=6), "departs"),  # other tile count
        (dict(prompt="Look carefully. X", images=[IMG2]), "departs"),  # other image size -> tiles
    ]
    for kw, match in cases:
        kw.setdefault("max_tiles", 2)
        with pytest.raises(UserError, match=match):
            list(stream_generate(model, processor, kw.pop("prompt"), kw.pop("images"), prompt_cache_file=f,
                                 max_tokens=2, **kw))
    # Same tile count and ids, different pixels: refused by the image hash.
    from PIL import Image

    im = Image.open(IMG1).convert("RGB")
    other = tmp_path / "flipped.png"
    im.transpose(Image.FLIP_LEFT_RIGHT).save(other)
    with pytest.raises(UserError, match="image/frame 1 of this request differs"):
        list(stream_generate(model, processor, "Look carefully. X", [other], max_tiles=2, prompt_cache_file=f,
                             max_tokens=2))


def test_other_model_revision_dtype_quantization_or_adapter_is_refused(build_case, qwen2, tmp_path):
    from mlx_internvl.adapters import LoraConfig, apply_lora
    from mlx_internvl.weights import quantize

    model, processor = qwen2
    f = tmp_path / "id.safetensors"
    save_prompt_cache_file(model, processor, f, "", [IMG1], max_tiles=1)
    src = build_case(QWEN2).original_dir
    PromptCacheFile.load(f, mlx_internvl.load(src, dtype="float32")[0])  # the same model, loaded again: accepted
    other, _ = mlx_internvl.load(build_case(Case("spec_draft_qwen2", seed=7)).original_dir, dtype="float32")
    with pytest.raises(UserError, match="another model or revision"):
        PromptCacheFile.load(f, other)
    # A new revision of the same checkpoint: one tensor changed.
    revised, _ = mlx_internvl.load(src, dtype="float32")
    w = revised.language_model.model.layers[0].mlp.down_proj.weight
    revised.language_model.model.layers[0].mlp.down_proj.weight = w + 1e-3
    with pytest.raises(UserError, match="another model or revision"):
        PromptCacheFile.load(f, revised)
    with pytest.raises(UserError, match="dtype float32, the model runs in float16"):
        PromptCacheFile.load(f, mlx_internvl.load(src, dtype="float16")[0])
    quant, _ = mlx_internvl.load(src, dtype="float32")
    quant.config.quantization = quantize(quant, 8, 32)
    with pytest.raises(UserError, match="quantization"):
        PromptCacheFile.load(f, quant)
    adapted, _ = mlx_internvl.load(src, dtype="float32")
    apply_lora(adapted, LoraConfig(rank=4))
    with pytest.raises(UserError, match="made with no adapter, the model has adapter"):
        PromptCacheFile.load(f, adapted)
    g = tmp_path / "adapted.safetensors"
    save_prompt_cache_file(adapted, processor, g, "", [IMG1], max_tiles=1)
    PromptCacheFile.load(g, adapted)
    mx.random.seed(0)
    for _, m in adapted.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape)  # another adapter on the same base
    with pytest.raises(UserError, match="made with adapter .*, the model has adapter"):
        PromptCacheFile.load(g, adapted)
    with pytest.raises(UserError, match="made with adapter .*, the model has no adapter"):
        PromptCacheFile.load(g, model)


def test_bad_files_and_paths(qwen2, tmp_path):
    model, processor = qwen2
    with pytest.raises(UserError, match="no such prompt-cache file"):
        PromptCacheFile.load(tmp_path / "missing.safetensors", model)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable prompt-cache file"):
        PromptCacheFile.load(junk, model)
    foreign = tmp_path / "foreign.safetensors"
    mx.save_safetensors(str(foreign), {"x": mx.zeros(2)}, metadata={"format": "mlx"})
    with pytest.raises(UserError, match="not a readable prompt-cache file|not an mlx-internvl prompt-cache"):
        PromptCacheFile.load(foreign, model)
    with pytest.raises(UserError, match="must end in .safetensors"):
        save_prompt_cache_file(model, processor, tmp_path / "x.bin", "", [IMG1])
    with pytest.raises(UserError, match="no such directory"):
        save_prompt_cache_file(model, processor, tmp_path / "nope" / "x.safetensors", "", [IMG1])


def test_an_interrupted_write_leaves_nothing(qwen2, tmp_path, monkeypatch):
    import mlx_internvl.prompt_cache as prompt_cache

    model, processor = qwen2
    f = tmp_path / "old.safetensors"
    save_prompt_cache_file(model, processor, f, "", [IMG1], max_tiles=1)
    before = f.read_bytes()

    def boom(path, cache, meta):
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(prompt_cache, "save_prompt_cache", boom)
    with pytest.raises(KeyboardInterrupt):
        save_prompt_cache_file(model, processor, f, "Other.", [IMG1], max_tiles=1)
    assert f.read_bytes() == before and os.listdir(tmp_path) == [f.name]


def test_metadata_names_the_model_and_the_ids(qwen2, tmp_path):
    model, processor = qwen2
    f = tmp_path / "m.safetensors"
    pcf = save_prompt_cache_file(model, processor, f, "", [IMG1], max_tiles=1)
    _, meta = mx.load(str(f), return_metadata=True)
    ident = json.loads(meta["0.identity"] if "0.identity" in meta else meta["identity"])
    assert ident["dtype"] == "float32" and ident["adapter"] == "none" and ident["model"].endswith("original")
    ids = json.loads(meta.get("0.token_ids") or meta["token_ids"])
    assert ids == pcf.token_ids
    expected = processor("", images=[IMG1], max_tiles=1)["input_ids"][0].tolist()
    assert expected[: len(ids)] == ids
    image_tokens = processor.image_token_id
    assert np.sum(np.array(ids) == image_tokens) == np.sum(np.array(expected) == image_tokens) > 0


# -- the weights identity: every byte of the checkpoint, its file digests remembered -----------------------------

def _unsampled_row(n_rows: int, width: int) -> int:
    """A row of an [n_rows, width] tensor that holds none of the 65 values a sampling fingerprint would read."""
    n = n_rows * width
    sampled = {(i * n) // 64 for i in range(64)} | {n - 1}
    return next(r for r in range(n_rows) if not any(r * width <= i < (r + 1) * width for i in sampled))


def _add_to_one_embedding_row(checkpoint):
    f = checkpoint / "model.safetensors"
    tensors, meta = mx.load(str(f), return_metadata=True)
    key = "language_model.model.embed_tokens.weight"
    w = np.array(tensors[key])
    w[_unsampled_row(*w.shape)] += 1.0
    tensors[key] = mx.array(w)
    mx.save_safetensors(str(f), tensors, metadata=meta)


@pytest.fixture
def digest_calls(tmp_path, monkeypatch):
    """The digest cache in a fresh directory, and a list that grows by one path per weight file hashed."""
    import mlx_internvl.digests as digests

    monkeypatch.setenv("MLX_INTERNVL_CACHE", str(tmp_path / "cache"))
    calls, real = [], digests._sha256_file
    monkeypatch.setattr(digests, "_sha256_file", lambda p: calls.append(p) or real(p))
    return calls


def test_a_change_to_one_embedding_row_refuses_the_old_cache(build_case, tmp_path, digest_calls):
    import shutil

    src = tmp_path / "ckpt"
    shutil.copytree(build_case(QWEN2).original_dir, src)
    model, processor = mlx_internvl.load(src, dtype="float32")
    f = tmp_path / "c.safetensors"
    save_prompt_cache_file(model, processor, f, "", [IMG1], max_tiles=1)
    _add_to_one_embedding_row(src)  # a new revision: one token's embedding moved
    revised, _ = mlx_internvl.load(src, dtype="float32")
    with pytest.raises(UserError, match="made by another model or revision .*Make the cache again"):
        PromptCacheFile.load(f, revised)


def test_the_weight_digests_are_not_recomputed_for_an_unchanged_checkpoint(build_case, tmp_path, digest_calls):
    import shutil

    from mlx_internvl.prompt_cache import model_identity

    src = tmp_path / "ckpt"
    shutil.copytree(build_case(QWEN2).original_dir, src)
    model, processor = mlx_internvl.load(src, dtype="float32")
    first = model_identity(model)
    assert sorted(p.name for p in digest_calls) == ["config.json", "model.safetensors"]
    f = tmp_path / "c.safetensors"
    save_prompt_cache_file(model, processor, f, "", [IMG1], max_tiles=1)
    PromptCacheFile.load(f, mlx_internvl.load(src, dtype="float32")[0])  # loaded again, in a new model object
    assert len(digest_calls) == 2 and model_identity(model) == first
    _add_to_one_embedding_row(src)
    assert model_identity(mlx_internvl.load(src, dtype="float32")[0])["weights"] != first["weights"]
    assert [p.name for p in digest_calls[2:]] == ["model.safetensors"]  # only the file that changed


def test_an_unwritable_digest_cache_costs_time_not_correctness(build_case, tmp_path, monkeypatch, digest_calls,
                                                               caplog):
    from mlx_internvl.prompt_cache import model_identity

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MLX_INTERNVL_CACHE", str(tmp_path / "file" / "cache"))  # cannot become a directory
    model, _ = mlx_internvl.load(build_case(QWEN2).original_dir, dtype="float32")
    assert model_identity(model) == model_identity(model)
    assert len(digest_calls) == 4 and "weight digests will be computed on every load" in caplog.text

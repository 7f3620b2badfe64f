"""Generation on tiny seeded checkpoints: greedy output equals transformers' own `generate()` of the same model,
batches equal one-by-one generation, a chat session equals upstream-style full re-rendering, and the stop,
streaming and length rules hold."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import ASSETS

import mlx_internvl
from builders import Case
from mlx_internvl.chat import ChatSession
from mlx_internvl.errors import UserError
from mlx_internvl.generate import batch_generate, generate, stream_generate, stream_tokens

IMG1, IMG2 = ASSETS / "images" / "image1.jpg", ASSETS / "images" / "chelsea.png"
CASES = {"qwen2": Case("smoke_qwen2"), "internlm2": Case("m_internlm2", text="internlm2", template="internlm2-chat"),
         "phi3": Case("gen_phi3", text="phi3", template="phi3-chat"),
         "gpt_oss": Case("m_gpt_oss", text="gpt_oss", template="internvl3_5_gpt_oss", seed=4)}


@pytest.fixture(scope="module")
def qwen2(build_case):
    built = build_case(CASES["qwen2"])
    model, processor = mlx_internvl.load(built.original_dir, dtype="float32")
    return built, model, processor


def torch_greedy(built, inputs, eos_id, max_new_tokens):
    """transformers' `generate` (greedy) on the same ids and pixels; new tokens only, stopping like ours."""
    import torch

    ids = torch.from_numpy(np.array(inputs["input_ids"]).astype(np.int64))
    extra = {}
    if inputs["pixel_values"] is not None:
        extra["pixel_values"] = torch.from_numpy(np.array(inputs["pixel_values"])).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        out = built.model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=eos_id, pad_token_id=0, **extra)
    new = out[0, ids.shape[1]:].tolist()
    return new[:-1] if new and new[-1] == eos_id else new


def our_tokens(model, processor, prompt, images, max_tokens, **kw):
    pieces = list(stream_generate(model, processor, prompt, images, max_tokens=max_tokens, **kw))
    toks = [p.token for p in pieces]
    return toks[:-1] if pieces[-1].finish_reason == "stop" else toks, pieces


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_equals_transformers_generate(build_case, name):
    built = build_case(CASES[name])
    model, processor = mlx_internvl.load(built.original_dir, dtype="float32")
    # Two images for Phi-3, one tile each: its tiny context (256) must hold the prompt and the 24 new tokens.
    images, tiles = ([IMG1], 4) if name != "phi3" else ([IMG1, IMG2], 1)
    inputs = processor("Describe the picture.", images=images, max_tiles=tiles)
    ours, pieces = our_tokens(model, processor, "Describe the picture.", images, 24, max_tiles=tiles)
    ref = torch_greedy(built, inputs, processor.eos_token_id, 24)
    assert ours == ref
    assert pieces[-1].prompt_tokens == inputs["input_ids"].shape[1]
    assert pieces[-1].generation_tokens == len(pieces) and pieces[-1].finish_reason in ("stop", "length")


def test_chunked_prefill_gives_the_same_tokens(qwen2):
    _, model, processor = qwen2
    whole, _ = our_tokens(model, processor, "Describe.", [IMG1], 12, max_tiles=4)
    chunked, _ = our_tokens(model, processor, "Describe.", [IMG1], 12, max_tiles=4, prefill_step_size=7)
    assert chunked == whole


def test_text_only_greedy_equals_transformers(qwen2):
    built, model, processor = qwen2
    inputs = processor("Say something.")
    ours, _ = our_tokens(model, processor, "Say something.", None, 16)
    assert ours == torch_greedy(built, inputs, processor.eos_token_id, 16)


def test_batch_equals_one_by_one(qwen2):
    _, model, processor = qwen2
    prompts = ["What is this?", "Compare these two pictures in detail, please.", "Hello!"]
    images = [[IMG1], [IMG1, IMG2], None]
    batch = batch_generate(model, processor, prompts, images, max_tokens=20, max_tiles=2)
    for prompt, ims, got in zip(prompts, images, batch.token_ids):
        alone, _ = our_tokens(model, processor, prompt, ims, 20, max_tiles=2)
        assert got == alone
    assert batch.generation_tokens == sum(len(t) for t in batch.token_ids)
    assert batch.texts[1] == processor.tokenizer.decode(batch.token_ids[1], skip_special_tokens=True).strip()


def test_chat_session_equals_full_rerendering(qwen2):
    _, model, processor = qwen2
    session = ChatSession(model, processor, max_tiles=2, max_tokens=12)
    a1 = session.ask("What is in the image?", images=[IMG1])
    q1 = "<image>\nWhat is in the image?"
    assert session.history == [(q1, a1)]
    # Turn 2 adds an image mid-conversation: it is named Image-2 in that turn's question.
    a2 = session.ask("And in this one?", images=[IMG2])
    q2 = "Image-2: <image>\nAnd in this one?"
    assert session.history[1] == (q2, a2)
    fresh = generate(model, processor, q2, [IMG1, IMG2], history=[(q1, a1)], max_tiles=2, max_tokens=12)
    assert a2 == fresh
    a3 = session.ask("Thanks.")
    assert a3 == generate(model, processor, "Thanks.", [IMG1, IMG2], history=[(q1, a1), (q2, a2)], max_tiles=2,
                          max_tokens=12)
    session.clear()
    assert session.history == [] and session.num_images == 0
    assert session.ask("What is in the image?", images=[IMG1]) == a1


def test_failed_turn_leaves_the_session_unchanged(qwen2):
    _, model, processor = qwen2
    session = ChatSession(model, processor, max_tiles=1, max_tokens=4)
    session.ask("Hi", images=[IMG1])
    with pytest.raises(UserError, match="no such file"):
        session.ask("And this?", images=[ASSETS / "images" / "missing.png"])
    with pytest.raises(UserError, match="placeholder"):
        session.ask("<image> <image>", images=[IMG2])
    assert len(session.history) == 1 and session.num_images == 1


def test_stops_on_the_template_end_token(qwen2):
    _, model, processor = qwen2
    stop = processor.eos_token_id
    calls = []

    def sampler(logprobs):  # greedy, except that the 4th token is the template's end token
        calls.append(1)
        return mx.array([stop]) if len(calls) == 4 else mx.argmax(logprobs, axis=-1)

    ids = processor("Hi")["input_ids"][0].tolist()
    pieces = list(stream_tokens(model, processor, ids, None, max_tokens=50, sampler=sampler))
    assert pieces[-1].finish_reason == "stop" and pieces[-1].token == stop
    assert pieces[-1].generation_tokens == 4 and len(pieces) == 4
    assert "<|im_end|>" not in "".join(p.text for p in pieces)


def test_seeded_sampling_is_reproducible(qwen2):
    _, model, processor = qwen2
    kw = dict(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    assert generate(model, processor, "Hi", **kw) == generate(model, processor, "Hi", **kw)


def test_prompt_longer_than_the_context(qwen2):
    _, model, processor = qwen2
    with pytest.raises(UserError, match="context is 512 tokens"):
        generate(model, processor, "word " * 600)
    # A prompt that fits stops at the context end instead of running past it.
    text = "q" * (500 - processor("")["input_ids"].shape[1])  # one token per byte with the tiny tokenizer
    n = processor(text)["input_ids"].shape[1]
    pieces = list(stream_generate(model, processor, text, max_tokens=1000))
    assert pieces[-1].generation_tokens <= 512 - n


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(max_tokens=0)])
def test_bad_sampling_arguments(qwen2, bad):
    _, model, processor = qwen2
    with pytest.raises(UserError):
        generate(model, processor, "Hi", **bad)

"""Where we could silently differ from upstream, checked against code we did not write:

- stopping and decoding: transformers' `generate(eos_token_id=<template end>)` (what upstream `chat()` calls) and
  the tokenizer's own `decode(skip_special_tokens=True)`, on the same forced token sequence — one that holds the
  tokenizer's eos and an id past the vocabulary (the embedding rows padded past the tokenizer);
- the LoRA optimizer: `torch.optim.AdamW` (upstream InternVL / XTuner / ms-swift) on the same gradients.
"""

import mlx.core as mx
import numpy as np
import pytest

import mlx_internvl
from builders import Case
from mlx_internvl.chat import ChatSession
from mlx_internvl.generate import batch_generate, generate, stream_generate
from mlx_internvl.sampling import SamplingOptions

CASE = Case("m_internlm2", text="internlm2", template="internlm2-chat")  # tokenizer eos </s>, template end <|im_end|>


@pytest.fixture(scope="module")
def setup(build_case):
    from transformers import AutoTokenizer

    built = build_case(CASE)
    model, processor = mlx_internvl.load(built.original_dir, dtype="float32")
    hf_tok = AutoTokenizer.from_pretrained(str(built.hf_dir))
    end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    eos = hf_tok.convert_tokens_to_ids("</s>")
    a, b, c = (hf_tok.convert_tokens_to_ids(t) for t in ("H", "i", "!"))
    past = len(hf_tok)  # no token has this id; the embedding table has rows for it
    assert past < model.config.llm_config["vocab_size"] and eos != end
    forced = [a, eos, past, b, past + 1, c, end, a, b]
    return built, model, processor, hf_tok, forced, end, eos


def forced_sampling(forced):
    step = [0]

    def sampler(logprobs):
        tok = forced[min(step[0], len(forced) - 1)]
        step[0] += 1
        return mx.array([tok] * logprobs.shape[0])

    return lambda self, special_tokens=(): (sampler, [])


def hf_generate(built, ids, forced, eos_token_id):
    """transformers' generate with the same forced choices; returns the new ids."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            k = min(input_ids.shape[1] - ids.shape[1], len(forced) - 1)
            out = torch.full_like(scores, -float("inf"))
            out[:, forced[k]] = 0.0
            return out

    with torch.no_grad():
        out = built.model.generate(input_ids=ids, max_new_tokens=len(forced), do_sample=False, pad_token_id=0,
                                   eos_token_id=eos_token_id, logits_processor=LogitsProcessorList([Force()]))
    return out[0, ids.shape[1]:].tolist()


def upstream_text(hf_tok, new_ids, stop_str="<|im_end|>"):
    """What upstream chat() returns: decode(skip_special_tokens=True), split on the stop string, strip."""
    return hf_tok.decode(new_ids, skip_special_tokens=True).split(stop_str)[0].strip()


@pytest.mark.parametrize("stop_on_eos", [False, True])
def test_stop_tokens_and_decoding_equal_transformers(setup, monkeypatch, stop_on_eos):
    import torch

    built, model, processor, hf_tok, forced, end, eos = setup
    ids = torch.tensor(processor("Hello")["input_ids"].tolist())
    ref_ids = hf_generate(built, ids, forced, [end, eos] if stop_on_eos else end)
    monkeypatch.setattr(SamplingOptions, "make", forced_sampling(forced))
    pieces = list(stream_generate(model, processor, "Hello", max_tokens=len(forced), stop_on_eos=stop_on_eos))
    assert [p.token for p in pieces] == ref_ids
    assert "".join(p.text for p in pieces).strip() == upstream_text(hf_tok, ref_ids)
    if not stop_on_eos:  # the default goes on past the tokenizer's eos, as upstream chat() does
        assert ref_ids == forced[:7] and upstream_text(hf_tok, ref_ids) == "Hi!"
    else:
        assert ref_ids == forced[:2]
    monkeypatch.setattr(SamplingOptions, "make", forced_sampling(forced))
    assert generate(model, processor, "Hello", max_tokens=len(forced), stop_on_eos=stop_on_eos) == \
        upstream_text(hf_tok, ref_ids)


def test_chat_history_holds_upstreams_text(setup, monkeypatch):
    built, model, processor, hf_tok, forced, end, _ = setup
    monkeypatch.setattr(SamplingOptions, "make", forced_sampling(forced))
    session = ChatSession(model, processor, max_tokens=len(forced))
    reply = session.ask("Hello")
    assert reply == upstream_text(hf_tok, forced[:7]) == "Hi!"
    assert session.history == [("Hello", "Hi!")]


def test_batch_generate_decodes_like_upstream(setup, monkeypatch):
    built, model, processor, hf_tok, forced, end, _ = setup
    monkeypatch.setattr(SamplingOptions, "make", forced_sampling(forced))
    result = batch_generate(model, processor, ["Hello"], max_tokens=len(forced))
    assert result.token_ids[0] == forced[:6] and result.texts == [upstream_text(hf_tok, forced[:7])]


def test_lora_adamw_equals_torch_adamw():
    """Our optimizer (as `lora` builds it, constant rate) against torch.optim.AdamW on the same gradients."""
    import torch

    from mlx_internvl.lora import TrainingArgs
    from mlx_internvl.lora.trainer import make_optimizer

    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((8, 16)).astype(np.float32)
    grads = [rng.standard_normal((8, 16)).astype(np.float32) * (1 + k) for k in range(20)]
    lr, wd = 1e-2, 0.05

    tp = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt = torch.optim.AdamW([tp], lr=lr, weight_decay=wd)

    def ours(bias_correction):
        opt = make_optimizer(TrainingArgs(lr=lr, min_lr=lr, weight_decay=wd, bias_correction=bias_correction), 20)
        params = {"w": mx.array(w0)}
        opt.init(params)
        steps = []
        for g in grads:
            before = np.array(params["w"])
            params = opt.apply_gradients({"w": mx.array(g)}, params)
            steps.append(np.abs(np.array(params["w"]) - before).mean())
        return np.array(params["w"]), steps

    torch_steps = []
    for g in grads:
        before = tp.detach().clone()
        tp.grad = torch.from_numpy(g)
        topt.step()
        torch_steps.append((tp.detach() - before).abs().mean().item())
    mine, steps = ours(True)
    np.testing.assert_allclose(mine, tp.detach().numpy(), rtol=0, atol=2e-6)
    # MLX's default (no bias correction) takes a first step about 1/sqrt(1 - 0.999) * (1 - 0.9) = 3.16x larger.
    _, raw_steps = ours(False)
    assert 2.5 < raw_steps[0] / torch_steps[0] < 3.5

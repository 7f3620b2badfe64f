"""InternVL3.5-GPT-OSS beyond the parity matrix: mxfp4 experts, the harmony template, reasoning, LoRA.

The parity matrix (`test_parity.py`, branches `backbone-gpt_oss`, `hf-layout-current-gpt_oss`) covers the float
checkpoint: sinks, sliding and full layers, fused experts, YaRN without truncation. Here: OpenAI's mxfp4 experts
against transformers' own mxfp4 dequantization; prompt ids against upstream's `internvl3_5_gpt_oss` template
(its `conversation.py`, loaded from `MLX_INTERNVL_UPSTREAM_GPT_OSS` when set; never part of this project) and,
always, against the harmony layout; the analysis/final split; LoRA. No o200k tokenizer is available offline: the
tiny tokenizer has the harmony markers as special tokens (builders.HARMONY).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ASSETS
from safetensors.numpy import load_file
from test_generate import our_tokens
from test_parity import GPT_OSS, TOKENS, Spec, check, make_inputs
from test_thinking import scripted

import mlx_internvl
from lora_fixtures import color_task
from mlx_internvl.chat import ChatSession
from mlx_internvl.errors import UserError
from mlx_internvl.generate import batch_generate, stream_generate
from mlx_internvl.loading import load, load_model
from mlx_internvl.lora import LoraConfig, TrainingArgs, finetune
from mlx_internvl.parity import compare, mlx_stages
from mlx_internvl.reference import ReferenceModel
from mlx_internvl.sampling import SamplingOptions
from mlx_internvl.templates import GPT_OSS_SYSTEM, chat_messages, get_template
from mlx_internvl.thinking import HarmonyParser, split_reasoning


def _mxfp4(rng, shape):
    """Random mxfp4 experts as OpenAI stores them: `blocks [E, out, in/32, 16]` uint8 (two fp4 codes a byte) and
    `scales [E, out, in/32]` (exponents biased by 127; 2^-5..2^-3 keeps the tiny model's logits apart)."""
    e, out, n_in = shape
    blocks = rng.integers(0, 256, (e, out, n_in // 32, 16), dtype=np.uint8)
    scales = rng.integers(122, 125, (e, out, n_in // 32), dtype=np.uint8)
    return blocks, scales


@pytest.fixture(scope="module")
def mxfp4_checkpoint(build_case, tmp_path_factory):
    """The GPT-OSS fixture with its experts replaced by random mxfp4 blocks, and the transformers model holding
    what transformers' own mxfp4 dequantization makes of them."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    built = build_case(GPT_OSS)
    out = tmp_path_factory.mktemp("gpt_oss_mxfp4") / "original"
    shutil.copytree(built.original_dir, out)
    state = load_file(str(out / "model.safetensors"))
    model = copy.deepcopy(built.model)
    rng = np.random.default_rng(11)
    text = model.config.text_config
    shapes = {"gate_up_proj": (text.num_local_experts, 2 * text.intermediate_size, text.hidden_size),
              "down_proj": (text.num_local_experts, text.hidden_size, text.intermediate_size)}
    for i, layer in enumerate(model.model.language_model.layers):
        for name, shape in shapes.items():
            key = f"language_model.model.layers.{i}.mlp.experts.{name}"
            blocks, scales = (torch.from_numpy(a) for a in _mxfp4(rng, shape))
            del state[key]
            state[key + "_blocks"], state[key + "_scales"] = blocks, scales
            with torch.no_grad():
                dense = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
                getattr(layer.mlp.experts, name).copy_(dense)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return built, model, out


def test_mxfp4_experts_match_transformers_dequantization(mxfp4_checkpoint):
    """Loading OpenAI's mxfp4 expert tensors (dequantized on conversion) gives the logits and greedy tokens of
    transformers running the same bytes dequantized by its own mxfp4 code."""
    built, model, path = mxfp4_checkpoint
    ids, pixels = make_inputs(built, Spec(GPT_OSS))
    ref = ReferenceModel(model).run_stages(ids, pixels, TOKENS)
    ours, _ = load_model(path, dtype="float32")
    gate = ours.language_model.model.layers[0].mlp.experts.gate_proj.weight
    assert gate.dtype == mx.float32 and gate.shape == (4, 32, 64)  # dense [E, I, H]: dequantized, not kept packed
    check(compare(ref, mlx_stages(ours, mx.array(ids), mx.array(pixels), TOKENS)), "mxfp4 experts")


UPSTREAM_ENV = "MLX_INTERNVL_UPSTREAM_GPT_OSS"
CONVERSATIONS = {  # (system or None, [(question, answer), ...] history, question, tiles per image)
    "one-image": (None, [], "<image>\nWhat is shown?", (2,)),
    "multi-image-history": (None, [("Hi.", "<|channel|>final<|message|>Hello!")],
                            "Image-1: <image>\nImage-2: <image>\nCompare them.", (1, 3)),
    "text-only-custom-system": ("Be brief.", [("2+2?", "<|channel|>final<|message|>4")], "And 3+3?", ()),
}


@pytest.fixture(scope="module")
def gpt_oss_processor(build_case):

    _, processor = load(build_case(GPT_OSS).original_dir, dtype="float32")
    return processor


def _upstream_conversation():

    folder = os.environ.get(UPSTREAM_ENV)
    if not folder:
        pytest.skip(f"set {UPSTREAM_ENV} to a folder holding upstream internvl_chat_gpt_oss's conversation.py "
                    "(internvl_chat_gpt_oss/internvl/model/internvl_chat/ of OpenGVLab/InternVL)")
    spec = importlib.util.spec_from_file_location("upstream_gpt_oss_conversation", Path(folder) / "conversation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _messages(history, question, answer=None):

    messages = chat_messages(question, history)
    return messages[:-1] + [(messages[-1][0], answer)] if answer else messages


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_prompt_ids_match_upstream_template(gpt_oss_processor, name):
    """Token-exact against upstream's own `internvl3_5_gpt_oss` (`get_prompt`, images expanded as its `chat()`
    does): the generation prompt, and the finished conversation training renders (last answer closed by
    `<|return|>`)."""
    conv_module = _upstream_conversation()
    system, history, question, tiles = CONVERSATIONS[name]
    tok, renderer = gpt_oss_processor.tokenizer, gpt_oss_processor.renderer
    for answer in (None, "<|channel|>final<|message|>Done."):
        conv = conv_module.get_conv_template("internvl3_5_gpt_oss")
        if system is not None:
            conv.system_message = system
        for q, a in history:
            conv.append_message(conv.roles[0], q)
            conv.append_message(conv.roles[1], a)
        conv.append_message(conv.roles[0], question)
        conv.append_message(conv.roles[1], answer)
        query = conv.get_prompt()
        for n in tiles:
            query = query.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (4 * n) + "</img>", 1)
        ours = renderer.render(_messages(history, question, answer), tiles, system=system).ids
        assert ours == list(tok.encode(query)), (name, answer)


def test_prompt_is_the_harmony_layout(gpt_oss_processor):
    """Always on: the layout written from upstream's template (spec 5.4) and OpenAI's harmony format - system,
    user and a bare assistant header; `<|end|>` after each message; `<|return|>` is the stop token."""

    tok, renderer = gpt_oss_processor.tokenizer, gpt_oss_processor.renderer
    text = renderer.render(_messages([("Hi.", "<|channel|>final<|message|>Hello!")], "Why?"), ()).text
    assert text == (f"<|start|>system<|message|>{GPT_OSS_SYSTEM}<|end|><|start|>user<|message|>Hi.<|end|>"
                    "<|start|>assistant<|channel|>final<|message|>Hello!<|end|><|start|>user<|message|>Why?<|end|>"
                    "<|start|>assistant")
    assert "Reasoning: low" in GPT_OSS_SYSTEM and "# Valid channels: final." in GPT_OSS_SYSTEM
    finished = renderer.render(_messages([], "Why?", "<|channel|>final<|message|>So."), ()).text
    assert finished.endswith("<|start|>assistant<|channel|>final<|message|>So.<|return|>")
    assert gpt_oss_processor.eos_token_id == tok.convert_tokens_to_ids("<|return|>")
    for marker in ("<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>"):
        assert len(tok.encode(marker)) == 1, marker


REPLY = ("<|channel|>analysis<|message|>The user asks why. Think.<|end|><|start|>assistant<|channel|>final"
         "<|message|>Because it is.")


@pytest.mark.parametrize("piece", [len(REPLY), 1, 3, 7])
def test_harmony_reply_splits_analysis_from_final(piece):
    """The analysis channel is the reasoning, the final channel the answer, however the stream is cut."""

    parser, reasoning, answer = HarmonyParser(), "", ""
    for i in range(0, len(REPLY), piece):
        r, a = parser.feed(REPLY[i:i + piece])
        reasoning, answer = reasoning + r, answer + a
    r, a = parser.finish()
    assert (reasoning + r, answer + a) == ("The user asks why. Think.", "Because it is.")


def test_harmony_reply_without_analysis_or_markers():

    template = get_template("internvl3_5_gpt_oss")
    assert split_reasoning("<|channel|>final<|message|> Hello! ", template=template) == ("", "Hello!")
    assert split_reasoning("plain text", template=template) == ("", "plain text")


def test_plain_answers_go_in_the_final_channel(gpt_oss_processor):
    """A plain answer (training data, an OpenAI client's assistant message) is rendered as upstream's GPT-OSS
    training data renders it, in the final channel; one with its own header is kept as it is."""
    renderer = gpt_oss_processor.renderer
    plain = renderer.render(_messages([("Hi.", "Hello!")], "Why?"), ()).text
    marked = renderer.render(_messages([("Hi.", "<|channel|>final<|message|>Hello!")], "Why?"), ()).text
    assert plain == marked
    rendered = renderer.render(_messages([], "Why?", "So."), (), loss_mask=True)
    answer = [i for i, m in zip(rendered.ids, rendered.loss_mask) if m]
    assert gpt_oss_processor.tokenizer.decode(answer) == "<|channel|>final<|message|>So.<|return|>"


def test_lora_trains_attention_and_experts_of_gpt_oss(build_case, tmp_path):
    """LoRA on the GPT-OSS backbone: by default every attention projection and the experts get adapters and the
    router does not; a few optimizer steps lower the validation loss, and the saved adapters load back."""


    built = build_case(GPT_OSS)
    color_task(tmp_path, 4, "train", seed=0)
    result = finetune(built.original_dir, tmp_path / "train.jsonl", tmp_path / "ad", val=tmp_path / "train.jsonl",
                      lora=LoraConfig(rank=4, alpha=8),
                      args=TrainingArgs(batch_size=2, iters=2, lr=5e-3, val_every=2, save_every=2),
                      dtype="float32", log=lambda *_: None)
    (_, before), (_, after) = result.val_losses[0], result.val_losses[-1]
    assert after < before, result.val_losses
    targets = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["targets"]
    assert {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"} <= set(targets)
    assert "mlp.router" not in targets
    saved = load_file(str(tmp_path / "ad" / "adapters.safetensors"))
    assert any("self_attn.q_proj.lora_b" in k for k in saved) and not any("router" in k for k in saved)
    model, _ = mlx_internvl.load(built.original_dir, dtype="float32", adapter_path=tmp_path / "ad")
    base, processor = mlx_internvl.load(built.original_dir, dtype="float32")
    assert processor.template.name == "internvl3_5_gpt_oss"  # trained on harmony-rendered conversations
    ids = mx.array([[5, 6, 7, 8]])
    assert np.abs(np.array(model(ids)) - np.array(base(ids))).max() > 1e-4


def test_thinking_switch_is_refused_for_gpt_oss(gpt_oss_processor):
    """The <think> switch would write a Qwen3 think block into a harmony prompt; it is refused, naming the fix."""
    for thinking in (True, False):
        with pytest.raises(UserError, match="Reasoning: low\\|medium\\|high"):
            gpt_oss_processor.renderer.render(_messages([], "Why?"), (), thinking=thinking)


@pytest.mark.parametrize("marker,text,finish", [
    ("<|channel|>", "<|channel|><|channel|><|channel|>", "length"),  # kept in the text, as upstream decodes
    ("<|end|>", "<|end|><|end|><|end|>", "length"),  # ends a message, not the reply: generation goes on
    ("<|return|>", "", "stop"),  # the template's stop token
])
def test_generation_keeps_harmony_markers_and_stops_on_return(build_case, marker, text, finish):
    """Through `stream_generate` on the GPT-OSS checkpoint, each marker forced with a logit bias."""
    model, processor = load(build_case(GPT_OSS).original_dir, dtype="float32")
    bias = {processor.tokenizer.convert_tokens_to_ids(marker): 1e4}
    pieces = list(stream_generate(model, processor, "Hi.", max_tokens=3, logit_bias=bias))
    assert "".join(p.text for p in pieces) == text and pieces[-1].finish_reason == finish


def test_server_reports_the_analysis_channel_as_reasoning_content(build_case, monkeypatch):
    """Through the real `openai` client: a scripted harmony reply comes back with the analysis channel as
    `reasoning_content` and the final channel as `content`, streamed or not; the markers are in neither."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")

    from server_util import serving

    _, processor = load(build_case(GPT_OSS).original_dir, dtype="float32")
    tok = processor.tokenizer
    script = list(tok.encode(REPLY)) + [tok.convert_tokens_to_ids("<|return|>")]
    with serving(build_case(GPT_OSS).original_dir) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        ask = dict(model="tiny", messages=[{"role": "user", "content": "Why?"}], max_tokens=len(script) + 4)
        monkeypatch.setattr(SamplingOptions, "make", scripted(script))
        msg = client.chat.completions.create(**ask).choices[0].message
        assert (msg.reasoning_content, msg.content) == ("The user asks why. Think.", "Because it is.")
        monkeypatch.setattr(SamplingOptions, "make", scripted(script))
        deltas = [c.choices[0].delta for c in client.chat.completions.create(**ask, stream=True) if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == msg.reasoning_content
        assert "".join(d.content or "" for d in deltas) == "Because it is."
        # reasoning_effort is harmony's reasoning level, written in the system message; the <think> switch is a 400.
        monkeypatch.setattr(SamplingOptions, "make", scripted(script))
        high = client.chat.completions.create(**ask, reasoning_effort="high")
        system = GPT_OSS_SYSTEM.replace("Reasoning: low", "Reasoning: high")
        assert high.usage.prompt_tokens == len(processor.renderer.render(_messages([], "Why?"), (), system).ids)
        assert high.usage.prompt_tokens != len(processor.renderer.render(_messages([], "Why?"), ()).ids)  # not "low"
        switch = {"chat_template_kwargs": {"enable_thinking": True}}
        for bad in (dict(reasoning_effort="none"), dict(extra_body=switch)):
            with pytest.raises(openai.BadRequestError, match="always reasons in its analysis channel"):
                client.chat.completions.create(**ask, **bad)
        with pytest.raises(openai.BadRequestError, match="no 'Reasoning: low|medium|high' line"):
            client.chat.completions.create(**dict(ask, messages=[{"role": "system", "content": "Be brief."}] +
                                                  ask["messages"]), reasoning_effort="low")


def test_batch_equals_one_by_one_across_the_sliding_window(build_case):
    """Rows of different lengths, all longer than the 8-token window, left-padded into one batch (mlx-lm's
    batched rotating caches for the sliding layers)."""
    model, processor = load(build_case(GPT_OSS).original_dir, dtype="float32")
    prompts, images = ["What is this?", "Hello!"], [[ASSETS / "images" / "image1.jpg"], None]
    batch = batch_generate(model, processor, prompts, images, max_tokens=12, max_tiles=2)
    for prompt, ims, got in zip(prompts, images, batch.token_ids):
        assert got == our_tokens(model, processor, prompt, ims, 12, max_tiles=2)[0]


def test_chat_history_keeps_the_reply_with_its_markers_as_upstream(build_case, monkeypatch):
    """Upstream `chat()` keeps the reply decoded with its special tokens and replays it as the assistant message;
    so does `ChatSession`, and turn 2's prompt is exactly that replay."""
    model, processor = load(build_case(GPT_OSS).original_dir, dtype="float32")
    tok = processor.tokenizer
    stop = tok.convert_tokens_to_ids("<|return|>")
    monkeypatch.setattr(SamplingOptions, "make", scripted(list(tok.encode(REPLY)) + [stop]))
    session = ChatSession(model, processor, max_tokens=64)
    assert session.ask("Why?") == REPLY
    assert session.history == [("Why?", REPLY)]
    monkeypatch.setattr(SamplingOptions, "make", scripted([stop]))
    last = list(session.stream("And?"))[-1]
    replay = processor.renderer.render(_messages([("Why?", REPLY)], "And?"), ()).ids
    assert last.prompt_tokens == len(replay)
    assert split_reasoning(session.history[0][1], template=processor.template) == (
        "The user asks why. Think.", "Because it is.")



def test_responses_api_puts_the_analysis_channel_in_a_reasoning_item(build_case, monkeypatch):
    """`/v1/responses` through the real `openai` client, created and streamed: the analysis channel is the
    `reasoning` item, the final channel the message; `reasoning.effort` is the system message's `Reasoning:` line."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")

    from mlx_internvl.render import Renderer
    from server_util import serving

    _, processor = load(build_case(GPT_OSS).original_dir, dtype="float32")
    tok = processor.tokenizer
    script = list(tok.encode(REPLY)) + [tok.convert_tokens_to_ids("<|return|>")]
    prompts, render = [], Renderer.render
    monkeypatch.setattr(Renderer, "render", lambda *a, **k: prompts.append(render(*a, **k)) or prompts[-1])
    thought, answer = "The user asks why. Think.", "Because it is."
    with serving(build_case(GPT_OSS).original_dir) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        ask = dict(model="tiny", input="Why?", max_output_tokens=len(script) + 4)
        monkeypatch.setattr(SamplingOptions, "make", scripted(script))
        r = client.responses.create(**ask)
        assert [o.type for o in r.output] == ["reasoning", "message"] and r.status == "completed"
        assert (r.output[0].content[0].text, r.output_text) == (thought, answer)
        analysis = REPLY[:REPLY.index("<|end|>") + len("<|end|>")]  # as generated, markers included
        assert r.usage.output_tokens_details.reasoning_tokens == len(tok.encode(analysis)) < r.usage.output_tokens
        assert "Reasoning: low" in prompts[-1].text  # the template's own level when no effort is asked
        monkeypatch.setattr(SamplingOptions, "make", scripted(script))
        with client.responses.stream(**ask, reasoning={"effort": "high"}) as s:
            events = list(s)
            final = s.get_final_response()
        assert f"<|start|>system<|message|>{GPT_OSS_SYSTEM.replace('Reasoning: low', 'Reasoning: high')}<|end|>" \
            in prompts[-1].text
        deltas = {k: "".join(e.delta for e in events if e.type == f"response.{k}_text.delta")
                  for k in ("reasoning", "output")}
        assert deltas == {"reasoning": thought, "output": answer}
        assert [e.item.type for e in events if e.type == "response.output_item.done"] == ["reasoning", "message"]
        assert (final.output[0].content[0].text, final.output_text) == (thought, answer)
        with pytest.raises(openai.BadRequestError, match="always reasons in its analysis channel"):
            client.responses.create(**ask, reasoning={"effort": "none"})

"""Prompts with tools, token for token against the backbone's own format, with InternVL's image placeholders.

Qwen2.5 and Qwen3 (InternVL2.5/3 and InternVL3.5): the oracle is transformers' `apply_chat_template(...,
tools=...)` with the real chat template of each tokenizer_config.json (tests/fixtures/tokenizers), given
InternVL's system message; its `<image>` is then expanded as InternVL expands it. InternLM2/2.5: no chat template
with tools exists in its tokenizer_config.json, so the oracle is the documented format (InternLM's
`chat/chat_format.md`, "Function Call": a `system name=<|plugin|>` turn with the functions as JSON, the call as
`<|action_start|><|plugin|>\\n{"name", "parameters"}<|action_end|>`, the result as an `environment name=<|plugin|>`
turn), tokenized piece by piece with sentencepiece itself. The conversation goes through the server's renderer
(the path a chat request takes), image included.
"""

import json
import re

import pytest
from test_templates import INTERNVL_TOKENS, TOK, config

from mlx_internvl.processing import Processor
from mlx_internvl.server.media import MediaPolicy
from mlx_internvl.server.protocol import parse_request
from mlx_internvl.server.render import Renderer
from mlx_internvl.server.tools import request_tools
from mlx_internvl.templates import INTERNVL2_5_SYSTEM
from mlx_internvl.tokenizer import load_tokenizer
from server_util import IMG1, data_url

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Das Wetter in einer Stadt (°C)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "local_time", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
ARGS = [{"city": "Zürich", "unit": "celsius"}, {"city": "Zürich"}]
RESULTS = ['{"temperature": 21}', "14:05"]
QUESTION = "Where is this, and how warm is it there now?"


def request(calls, content="", thinking=None):
    """An OpenAI request: an image question, an assistant turn with `calls`, their results, to be answered."""
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                             {"type": "image_url", "image_url": {"url": data_url(IMG1)}}]},
                {"role": "assistant", "content": content, "tool_calls": [
                    {"id": f"c{i}", "type": "function",
                     "function": {"name": n, "arguments": json.dumps(a)}} for i, (n, a) in enumerate(calls)]}]
    messages += [{"role": "tool", "tool_call_id": f"c{i}", "content": r} for i, r in enumerate(RESULTS[:len(calls)])]
    body = {"model": "m", "messages": messages, "tools": [WEATHER, TIME], "max_tiles": 2}
    if thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": thinking}
    return parse_request(json.dumps(body).encode(), 200000)


def server_render(proc, req, thinking=None):
    renderer = Renderer(proc, MediaPolicy())
    prompt = renderer.render(req, thinking, request_tools(req, proc))
    return prompt, proc.tokenizer.decode(prompt.ids)


def expand(text, num_tiles, per_tile=256):
    for n in num_tiles:
        text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (per_tile * n) + "</img>", 1)
    return text


@pytest.fixture(scope="module", params=["qwen2_5", "qwen3"])
def qwen(request, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOK / request.param))
    tok.add_tokens(INTERNVL_TOKENS, special_tokens=True)
    out = tmp_path_factory.mktemp(request.param)
    tok.save_pretrained(str(out))
    model_type = "qwen3" if request.param == "qwen3" else "qwen2"
    return AutoTokenizer.from_pretrained(str(out)), Processor(load_tokenizer(out), config(None, model_type))


@pytest.mark.parametrize("calls,content", [([("get_weather", ARGS[0])], ""),
                                           ([("get_weather", ARGS[0]), ("local_time", ARGS[1])], "Let me look.")])
def test_qwen_tools_match_transformers_template(qwen, calls, content):
    hf, proc = qwen
    req = request(calls, content)
    prompt, _ = server_render(proc, req)
    oracle = [{"role": "system", "content": INTERNVL2_5_SYSTEM},
              {"role": "user", "content": "<image>\n" + QUESTION},
              {"role": "assistant", "content": content,
               "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}]
    oracle += [{"role": "tool", "content": r} for r in RESULTS[:len(calls)]]
    text = hf.apply_chat_template(oracle, tools=[WEATHER, TIME], add_generation_prompt=True, tokenize=False)
    tiles = [p.num_tiles for p in prompt.images]
    assert len(tiles) == 1
    assert prompt.ids == hf.encode(expand(text, tiles), add_special_tokens=False)
    assert "<tool_call>" in text and "Zürich" in text and "°C" in text  # the oracle rendered the calls and tools


def test_qwen3_tools_with_thinking_off(qwen):
    hf, proc = qwen
    if "enable_thinking" not in hf.chat_template:
        pytest.skip("Qwen2.5's template has no thinking switch")
    prompt, _ = server_render(proc, request([("get_weather", ARGS[0])], thinking=False), thinking=False)
    oracle = [{"role": "system", "content": INTERNVL2_5_SYSTEM}, {"role": "user", "content": "<image>\n" + QUESTION},
              {"role": "assistant", "content": "",
               "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": ARGS[0]}}]},
              {"role": "tool", "content": RESULTS[0]}]
    text = hf.apply_chat_template(oracle, tools=[WEATHER, TIME], add_generation_prompt=True, tokenize=False,
                                  enable_thinking=False)
    assert prompt.ids == hf.encode(expand(text, [p.num_tiles for p in prompt.images]), add_special_tokens=False)


def plugin_format(content, name, args, result, tiles, sep, system):
    """InternLM's documented function-call format (chat/chat_format.md) inside InternVL's template."""
    functions = json.dumps([WEATHER["function"], TIME["function"]], ensure_ascii=False)
    call = json.dumps({"name": name, "parameters": args}, ensure_ascii=False)
    return expand(f"<|im_start|>system\n{system}{sep}<|im_start|>system name=<|plugin|>\n{functions}{sep}"
                  f"<|im_start|>user\n<image>\n{QUESTION}{sep}<|im_start|>assistant\n{content}"
                  f"<|action_start|><|plugin|>\n{call}<|action_end|>{sep}"
                  f"<|im_start|>environment name=<|plugin|>\n{result}{sep}<|im_start|>assistant\n", tiles)


@pytest.mark.parametrize("template,sep", [("internvl2_5", "<|im_end|>\n"), ("internlm2-chat", "<|im_end|>")])
def test_internlm2_plugin_format(template, sep):
    import sentencepiece as spm

    proc = Processor(load_tokenizer(TOK / "internlm2"), config(template, "llama"))
    prompt, _ = server_render(proc, request([("get_weather", ARGS[0])], "Ich schaue nach."))
    expect = plugin_format("Ich schaue nach.", "get_weather", ARGS[0], RESULTS[0],
                           [p.num_tiles for p in prompt.images], sep, proc.template.system_message)
    sp = spm.SentencePieceProcessor(model_file=str(TOK / "internlm2" / "tokenizer.model"))
    specials = {t: proc.tokenizer.convert_tokens_to_ids(t) for t in
                ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<|plugin|>", "<|action_start|>",
                 "<|action_end|>"]}
    assert specials["<|plugin|>"] == 92538 and specials["<|action_start|>"] == 92541  # InternLM's documented ids
    want = [1]
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", expect):
        if part:
            want += [specials[part]] if part in specials else sp.encode(part)
    assert prompt.ids == want

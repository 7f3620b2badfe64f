"""The tool-call parser and the forcing grammar, without a model.

The parser must read the same calls and content however the text is cut into stream pieces, leave a block that is
not a call as content (no bogus calls), and read what mlx-lm's own `json_tools` parser reads when the keys come in
another order. The grammar, driven by random choices among the tokens llguidance allows, with the real Qwen2.5 and
InternLM2 tokenizers, must only ever give calls whose arguments validate with `jsonschema`."""

import json
import random

import jsonschema
import numpy as np
import pytest
from test_templates import INTERNVL_TOKENS, TOK, config
from test_tools_server import SCHEMAS, TOOLS

from mlx_internvl.errors import UserError
from mlx_internvl.processing import Processor
from mlx_internvl.tokenizer import load_tokenizer
from mlx_internvl.tools import HERMES, PLUGIN, ToolCallParser, parse_tool_calls, parse_tool_choice, parse_tools

TEXT = ('Let me see. <tool_call>\n{"name": "local_time", "arguments": {"zone": "C\\"ET}"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "hours": [1, 2]}}\n</tool_call>')


def pieces(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 40))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def streamed(fmt, text, rng, max_calls=None):
    p = ToolCallParser(fmt, max_calls)
    events = [e for piece in pieces(text, rng) for e in p.feed(piece)] + p.finish()
    args = {}
    for e in events:
        if e[0] == "arguments":
            args[e[1]] = args.get(e[1], "") + e[2]
    content = "".join(e[1] for e in events if e[0] == "content").strip()
    return content, [(c.name, args.get(i, "")) for i, c in enumerate(p.calls)]


def test_stream_pieces_do_not_change_the_calls():
    content, calls = parse_tool_calls(HERMES, TEXT)
    assert content == "Let me see."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("local_time", {"zone": 'C"ET}'}), ("get_weather", {"city": "Zürich", "hours": [1, 2]})]
    rng = random.Random(0)
    for _ in range(200):
        assert streamed(HERMES, TEXT, rng) == (content, [(c.name, c.arguments) for c in calls])
    assert streamed(HERMES, TEXT, rng, max_calls=1) == (content, [(c.name, c.arguments) for c in calls[:1]])


def test_blocks_that_are_not_calls_stay_content():
    for junk in ["<tool_call>not json</tool_call>", '<tool_call>\n{"arguments": {}}\n</tool_call>',
                 '<tool_call>{"name": 3}</tool_call>', "<tool_call>\n{\"name\": [", "a <tool_c"]:
        content, calls = parse_tool_calls(HERMES, "x " + junk)
        assert calls == [] and content == ("x " + junk).strip(), junk


def test_other_key_order_reads_as_mlx_lm_reads_it():
    from mlx_lm.tool_parsers import json_tools

    body = '{"arguments": {"zone": "UTC"}, "name": "local_time"}'
    _, (call,) = parse_tool_calls(HERMES, f"<tool_call>\n{body}\n</tool_call>")
    want = json_tools.parse_tool_call(body)
    assert (call.name, json.loads(call.arguments)) == (want["name"], want["arguments"])


def test_plugin_calls():
    text = ('I will check.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Oslo"}}'
            '<|action_end|>')
    content, (call,) = parse_tool_calls(PLUGIN, text)
    assert content == "I will check." and (call.name, call.arguments) == ("get_weather", '{"city": "Oslo"}')
    assert streamed(PLUGIN, text, random.Random(1)) == (content, [(call.name, call.arguments)])


def test_tools_and_tool_choice_checks():
    tools = parse_tools(TOOLS)
    assert [t.name for t in tools] == ["get_weather", "local_time"] and tools[0].strict and not tools[1].strict
    assert parse_tool_choice(None, tools) == ("auto", None) and parse_tool_choice(None, []) == ("none", None)
    assert parse_tool_choice({"type": "function", "function": {"name": "local_time"}}, tools) == (
        "function", "local_time")
    with pytest.raises(UserError, match=r"tools.1.function.parameters: invalid JSON Schema at properties/x/type"):
        parse_tools(TOOLS[:1] + [{"type": "function", "function": {"name": "g", "parameters": {
            "type": "object", "properties": {"x": {"type": 5}}}}}])


def sample(proc, grammar, seed):
    import llguidance
    import llguidance.numpy as llnp

    from mlx_internvl.structured import ll_tokenizer

    n_vocab = len(proc.tokenizer.get_vocab())
    lltok = ll_tokenizer(proc.tokenizer, n_vocab, [proc.eos_token_id])
    matcher, mask, rng = llguidance.LLMatcher(lltok, grammar.lark), llnp.allocate_token_bitmask(1, n_vocab), \
        np.random.default_rng(seed)
    ids = []
    while not matcher.is_stopped() and len(ids) < 400:
        llnp.fill_next_token_bitmask(matcher, mask)
        allowed = np.nonzero(np.unpackbits(mask[0].view(np.uint8), bitorder="little")[:n_vocab])[0]
        ids.append(int(rng.choice(allowed)))
        assert matcher.consume_token(ids[-1]), matcher.get_error()
    assert matcher.is_stopped()  # (after the end token, or where nothing can follow: the constraint then ends it)
    return proc.tokenizer.decode(ids[:-1] if ids[-1] == proc.eos_token_id else ids, skip_special_tokens=False)


@pytest.fixture(scope="module", params=["qwen2_5", "internlm2"])
def real(request, tmp_path_factory):
    if request.param == "internlm2":
        return PLUGIN, Processor(load_tokenizer(TOK / "internlm2"), config("internvl2_5", "llama"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOK / "qwen2_5"))
    tok.add_tokens(INTERNVL_TOKENS, special_tokens=True)
    out = tmp_path_factory.mktemp("qwen25")
    tok.save_pretrained(str(out))
    return HERMES, Processor(load_tokenizer(out), config(None))


@pytest.mark.parametrize("mode,name", [("required", None), ("function", "get_weather")])
def test_forced_calls_with_real_tokenizers_validate(real, mode, name):
    from mlx_internvl.server.tools import ToolSetup
    from mlx_internvl.tools import tool_format

    fmt, proc = real
    assert tool_format(proc) is fmt
    setup = ToolSetup(fmt, parse_tools(TOOLS), mode, name, parallel=True)
    for seed in range(4):
        text = sample(proc, setup.grammar(proc), seed)
        content, calls = parse_tool_calls(fmt, text)
        assert content == "" and calls, text
        assert len(calls) == 1 or (fmt.parallel and mode == "required")
        for c in calls:
            assert name in (None, c.name)
            jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])

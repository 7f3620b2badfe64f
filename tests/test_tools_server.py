"""Tool calls through the server, driven by the real `openai` client on tiny random-weight checkpoints of both
tokenizer kinds (byte-level BPE with the Qwen `<tool_call>` format, InternLM2's sentencepiece with its plugin
format). Random weights prove the constraint: whatever the model prefers, a forced call names the function and its
arguments validate with `jsonschema`."""

import json

import jsonschema
import pytest

from builders import Case
from server_util import IMG1, serving, user

openai = pytest.importorskip("openai")

WEATHER_ARGS = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 2, "maxLength": 12},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "minItems": 1,
              "maxItems": 3}},
    "required": ["city", "unit", "days", "hours"], "additionalProperties": False}
TIME_ARGS = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
             "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER_ARGS, "strict": True}},
         {"type": "function", "function": {"name": "local_time", "parameters": TIME_ARGS}}]
SCHEMAS = {"get_weather": WEATHER_ARGS, "local_time": TIME_ARGS}
# A longer context than the other tiny cases: the tools preamble is ~1,000 byte-level tokens.
LONG = {"max_position_embeddings": 4096}
CASES = {"bpe": Case("tools_qwen2", extra_text=LONG),
         "sentencepiece": Case("tools_internlm2_sp", text="internlm2", template="internlm2-chat", tokenizer="internlm2",
                               extra_text=LONG)}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module", params=list(CASES))
def client(request, build_case):
    built = build_case(CASES[request.param])
    with serving(built.original_dir, max_tokens=200) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, messages=None, **kw):
    kw.setdefault("temperature", 1.0)
    return client.chat.completions.create(model="tiny", messages=messages or [user("Weather in Paris?")],
                                          tools=TOOLS, **kw)


def check_call(call, name=None):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in SCHEMAS and (name is None or call.function.name == name)
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", [1, 2])
def test_named_function_is_called_with_valid_arguments(client, seed):
    r = ask(client, tool_choice=NAMED, seed=seed)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0], "get_weather")


def test_required_calls_a_tool_with_an_image(client):
    for seed in (3, 4, 5):
        r = ask(client, [user("Which tool?", IMG1)], tool_choice="required", parallel_tool_calls=False, seed=seed,
                extra_body={"max_tiles": 1})
        assert r.choices[0].finish_reason == "tool_calls"
        (call,) = r.choices[0].message.tool_calls
        check_call(call)


def test_streamed_deltas_assemble_into_the_same_call(client):
    whole = ask(client, tool_choice="required", seed=11).choices[0].message.tool_calls
    calls, finish = {}, None
    for c in ask(client, tool_choice="required", seed=11, stream=True):
        if not c.choices:
            continue
        for d in c.choices[0].delta.tool_calls or []:
            got = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
            assert d.id in (None, got["id"])
            got["arguments"] += d.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.function.name, c.function.arguments) for c in whole]
    assert all(c["id"] and c["id"].startswith("call_") for c in calls.values())
    for c in whole:
        check_call(c)


def test_a_tool_result_turn_is_answered(client):
    call = ask(client, tool_choice=NAMED, seed=2).choices[0].message.tool_calls[0]
    history = [user("Weather in Paris?"),
               {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    r = ask(client, history, seed=1, max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content is not None
    assert r.usage.prompt_tokens > ask(client, seed=1, max_tokens=1).usage.prompt_tokens
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, history, seed=1, max_tokens=8,
                                                                     stream=True) if c.choices)
    assert streamed == r.choices[0].message.content


def test_none_and_auto_give_no_bogus_calls(client):
    shown = ask(client, max_tokens=1)
    for seed in range(3):
        none = ask(client, tool_choice="none", seed=seed, max_tokens=24)
        auto = ask(client, seed=seed, max_tokens=24)
        for r in (none, auto):
            assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"
    assert none.usage.prompt_tokens < shown.usage.prompt_tokens  # "none" does not show the tools


@pytest.mark.parametrize("kw,param,words", [
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools", "tools.0.function.name"),
    (dict(tools=[{"type": "retrieval"}]), "tools", "tools.0"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]), "tools",
     "tools.0.function.parameters"),
    (dict(tools=TOOLS + TOOLS[:1]), "tools", "defined twice"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", "'nope'"),
    (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice", "tool_choice"),
    (dict(tool_choice="required"), "tool_choice", "needs at least one tool"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "format": "weird"}}}}}], tool_choice="required"),
     "tools", "Unknown format: weird"),
    (dict(tools=TOOLS, response_format={"type": "json_object"}), "response_format", "cannot be combined"),
])
def test_bad_tools_are_400s_naming_the_field(client, kw, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[user("x")], **kw)
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body


def test_bad_history_call_arguments_are_a_400(client):
    history = [user("x"), {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "local_time", "arguments": "{zone: UTC}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "12:00"}]
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, history)
    assert e.value.body["param"] == "messages.1.tool_calls.0.function.arguments"



def test_two_calls_in_one_turn_only_where_the_format_has_them(client, request):
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "local_time", "arguments": '{"zone": "UTC"}'}}
             for i in range(2)]
    history = [user("x"), {"role": "assistant", "tool_calls": calls}] + [
        {"role": "tool", "tool_call_id": f"c{i}", "content": "12:00"} for i in range(2)]
    if request.node.callspec.params["client"] == "bpe":  # Qwen's format: both calls, both results in one turn
        assert ask(client, history, max_tokens=2).choices[0].finish_reason in ("stop", "length")
        return
    with pytest.raises(openai.BadRequestError) as e:  # InternLM2's plugin format: one call per assistant turn
        ask(client, history, max_tokens=2)
    assert e.value.body["param"] == "messages.1.tool_calls" and "one call per assistant turn" in e.value.body["message"]

"""Function tools through `/v1/responses` with the real `openai` client: Responses' flat function tools and
`tool_choice` reach the chat path's tool calls (a forced call's arguments validate with `jsonschema` and equal the
chat completion's for the same seed), a streamed call assembles from `response.function_call_arguments.delta`
into the same call, and a `function_call_output` turn after `previous_response_id` renders the prompt a chat
client sends with `tool_calls` and a `tool` message."""

import json

import jsonschema
import pytest
from test_tools_server import CASES, SCHEMAS, TOOLS, WEATHER_ARGS

from server_util import serving, user

openai = pytest.importorskip("openai")

FLAT = [{"type": "function", **t["function"]} for t in TOOLS]  # Responses' function tools are flat
NAMED = {"type": "function", "name": "get_weather"}


@pytest.fixture(scope="module")
def client(build_case):
    built = build_case(CASES["bpe"])
    with serving(built.original_dir, max_tokens=200) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, **kw):
    return client.responses.create(model="tiny", input="Weather in Paris?", tools=FLAT, temperature=1.0, **kw)


def test_forced_call_is_the_chat_call(client):
    r = ask(client, tool_choice=NAMED, extra_body={"seed": 3})
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER_ARGS)
    chat = client.chat.completions.create(model="tiny", messages=[user("Weather in Paris?")], tools=TOOLS,
                                          temperature=1.0, seed=3, tool_choice={"type": "function",
                                                                                "function": {"name": "get_weather"}})
    assert chat.choices[0].message.tool_calls[0].function.arguments == call.arguments
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    required = ask(client, tool_choice="required", parallel_tool_calls=False, extra_body={"seed": 4})
    calls = [o for o in required.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name in SCHEMAS
    jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS[calls[0].name])


def test_streamed_call_assembles_into_the_same_call(client):
    whole = ask(client, tool_choice="required", extra_body={"seed": 11})
    with client.responses.stream(model="tiny", input="Weather in Paris?", tools=FLAT, temperature=1.0,
                                 tool_choice="required", extra_body={"seed": 11}) as s:
        events = list(s)
        final = s.get_final_response()
    added = [e.item for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    want = [(o.name, o.arguments) for o in whole.output if o.type == "function_call"]
    assert [(a.name, "") for a in added] == [(n, "") for n, _ in want] and args == "".join(a for _, a in want)
    assert [(o.name, o.arguments) for o in final.output if o.type == "function_call"] == want
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_function_call_output_turn(client):
    r = ask(client, tool_choice=NAMED, extra_body={"seed": 5})
    [call] = [o for o in r.output if o.type == "function_call"]
    result = '{"temperature": 21}'
    nxt = client.responses.create(model="tiny", tools=FLAT, previous_response_id=r.id, max_output_tokens=8,
                                  input=[{"type": "function_call_output", "call_id": call.call_id, "output": result}])
    chat = client.chat.completions.create(model="tiny", tools=TOOLS, max_tokens=8, messages=[
        user("Weather in Paris?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": result}])
    assert nxt.usage.input_tokens == chat.usage.prompt_tokens
    # the same turn sent whole, as the client's own output items (no store involved)
    again = client.responses.create(model="tiny", tools=FLAT, max_output_tokens=8, store=False, input=[
        {"role": "user", "content": "Weather in Paris?"}, *[o.model_dump() for o in r.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": result}])
    assert again.usage.input_tokens == chat.usage.prompt_tokens


def test_other_tool_types_are_refused(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tiny", input="x", tools=[{"type": "web_search"}])
    assert e.value.body["param"] == "tools.0" and "accepts 'function'" in e.value.body["message"]

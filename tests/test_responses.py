"""`/v1/responses` driven by the real `openai` client: the reply is the chat-completions reply for the same
conversation (prompt tokens and greedy text), with images and `instructions`; `text.format` JSON Schemas validate
with `jsonschema` (and `responses.parse` fills a pydantic model); the stream's events arrive in the order and shape
the client assembles, into the same text; `previous_response_id` continues a stored conversation, which is bounded;
bad input is a 400 naming the Responses field."""

import json
from typing import List, Literal

import jsonschema
import pytest
from test_structured import PERSON

from builders import Case
from server_util import IMG1, data_url, serving, user

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

STORE_SIZE = 3


@pytest.fixture(scope="module")
def served(build_case):
    built = build_case(Case("smoke_qwen2"))
    with serving(built.original_dir, max_tokens=24, response_store_size=STORE_SIZE) as (url, app):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120), app


@pytest.fixture
def client(served):
    return served[0]


def image_input(text, *images):
    return [{"role": "user", "content": [{"type": "input_text", "text": text}]
             + [{"type": "input_image", "image_url": data_url(p)} for p in images]}]


def test_create_is_the_chat_reply_with_image_and_instructions(client):
    r = client.responses.create(model="tiny", input=image_input("What is this?", IMG1), instructions="Be brief.",
                                max_output_tokens=10, extra_body={"max_tiles": 2})
    chat = client.chat.completions.create(model="tiny", max_tokens=10, extra_body={"max_tiles": 2},
                                          messages=[{"role": "system", "content": "Be brief."},
                                                    user("What is this?", IMG1)])
    assert r.object == "response" and r.id.startswith("resp_") and r.instructions == "Be brief."
    assert r.output_text == chat.choices[0].message.content
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    [msg] = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "output_text"
    # cut by max_output_tokens: incomplete, and says why
    assert chat.choices[0].finish_reason == "length"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert msg.status == "incomplete"
    plain = client.responses.create(model="tiny", input="What is this?", max_output_tokens=10)
    assert plain.usage.input_tokens > r.usage.input_tokens  # the instructions replaced the long default system text


def test_json_schema_and_parse(client):
    r = client.responses.create(model="tiny", input="Describe a person.", temperature=1.0, max_output_tokens=300,
                                text={"format": {"type": "json_schema", "name": "person", "schema": PERSON,
                                                 "strict": True}}, extra_body={"seed": 5})
    assert r.status == "completed" and r.incomplete_details is None
    jsonschema.validate(json.loads(r.output_text), PERSON)
    assert r.text.format.type == "json_schema" and r.text.format.name == "person"

    class Flags(pydantic.BaseModel):
        ok: bool
        level: int
        kinds: List[Literal["a", "bb"]]

    parsed = client.responses.parse(model="tiny", input="Set the flags.", text_format=Flags, temperature=1.0,
                                    max_output_tokens=300, extra_body={"seed": 6})
    assert isinstance(parsed.output_parsed, Flags)
    obj = client.responses.create(model="tiny", input="Any object.", text={"format": {"type": "json_object"}},
                                  max_output_tokens=300, temperature=1.0, extra_body={"seed": 7})
    assert obj.status != "completed" or isinstance(json.loads(obj.output_text), dict)


def test_stream_assembles_to_the_same_reply(client):
    ask = dict(model="tiny", input=image_input("Describe it.", IMG1), max_output_tokens=12,
               extra_body={"max_tiles": 1})
    whole = client.responses.create(**ask)
    with client.responses.stream(**ask) as s:
        events = list(s)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text and events[-4].text == text  # output_text.done carries the whole text
    final = events[-1].response
    assert final.status == "incomplete" and final.output_text == text
    assert (final.usage.input_tokens, final.usage.output_tokens) == (whole.usage.input_tokens,
                                                                     whole.usage.output_tokens)
    assert events[-2].item.content[0].text == text  # output_item.done, as the client's snapshot has it
    # a reply that ends by itself: response.completed, and the client's own accumulation of it
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    with client.responses.stream(model="tiny", input="Describe a person.", text=fmt, max_output_tokens=300) as s:
        final = s.get_final_response()
    jsonschema.validate(json.loads(final.output_text), PERSON)
    done = client.responses.create(model="tiny", input="Describe a person.", text=fmt, max_output_tokens=300)
    assert final.output_text == done.output_text and final.status == "completed"


def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(model="tiny", input="Hello there.", instructions="Be brief.")
    second = client.responses.create(model="tiny", input="And then?", previous_response_id=first.id)
    # what a chat client sends for the same conversation (instructions are not carried to the next response)
    chat = client.chat.completions.create(model="tiny", messages=[
        user("Hello there."), {"role": "assistant", "content": first.output_text}, user("And then?")])
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == chat.choices[0].message.content
    assert client.responses.retrieve(second.id).output_text == second.output_text
    unkept = client.responses.create(model="tiny", input="Hello there.", store=False)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="tiny", input="More.", previous_response_id=unkept.id)
    assert e.value.body["param"] == "previous_response_id" and unkept.id in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)


def test_the_store_is_bounded(served):
    client, app = served
    ids = [client.responses.create(model="tiny", input=f"Turn {k}.", max_output_tokens=2).id
           for k in range(STORE_SIZE + 1)]
    assert len(app.state.responses) == STORE_SIZE
    with pytest.raises(openai.BadRequestError, match=ids[0]):
        client.responses.create(model="tiny", input="More.", previous_response_id=ids[0])
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])
    assert client.responses.retrieve(ids[-1]).id == ids[-1]
    client.responses.delete(ids[-1])
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[-1])


def test_the_store_counts_bytes():
    from mlx_internvl.server.responses_protocol import ResponseStore

    store = ResponseStore(10, max_bytes=1000)
    store.put("a", [{"role": "user", "content": "x" * 600}], {})
    store.put("b", [{"role": "user", "content": "y" * 600}], {})  # together over 1000: the older one leaves
    assert store.get("a") is None and store.get("b") is not None
    store.put("c", [{"role": "user", "content": "z" * 2000}], {})  # larger than the whole store: not kept
    assert store.get("c") is None and store.nbytes == store.get("b").nbytes


@pytest.mark.parametrize("body, param, words", [
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input.0.content.0",
     "'input_text', 'input_image'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "input.0.content.0.image_url", "file store"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0", "accepts 'function'"),
    ({"input": "x", "background": True}, "background", "within the request"),
    ({"input": "x", "tool_choice": {"type": "web_search"}}, "tool_choice", '"required" or {"type": "function"'),
    ({"input": 5}, "input", "a string or a list"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "greater than"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {"type": "object", "properties": {
        "a": {"type": "string", "minLength": -1}}}}}}, "text.format", "properties/a/minLength"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}],
      "instructions": "Be brief."}, "input.0.content.0.image_url", "image"),
])
def test_bad_requests_name_the_field(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/responses", body={"model": "tiny", **body}, cast_to=object)
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body
    assert "messages" not in e.value.body["message"]


def test_a_failure_after_the_stream_began_is_response_failed(client, monkeypatch):
    import mlx.core as mx

    from mlx_internvl.sampling import SamplingOptions

    steps = [0]

    def sampler(logprobs):  # greedy for a few tokens, then the decode step breaks
        steps[0] += 1
        if steps[0] > 6:
            raise RuntimeError("broken decode step")
        return mx.argmax(logprobs, axis=-1)

    monkeypatch.setattr(SamplingOptions, "make", lambda self, special_tokens=(): (sampler, []))
    with client.responses.stream(model="tiny", input="Tell me more.", max_output_tokens=20) as s:
        events = list(s)
    assert events[0].type == "response.created" and "response.output_text.delta" in [e.type for e in events]
    last = events[-1]
    assert last.type == "response.failed" and last.response.status == "failed"
    assert "broken decode step" in last.response.error.message
    monkeypatch.undo()
    assert client.responses.create(model="tiny", input="Still there?", max_output_tokens=3).status == "incomplete"

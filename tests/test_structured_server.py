"""`response_format` through the server, driven by the real `openai` client on tiny random-weight checkpoints of
both tokenizer kinds (byte-level BPE and InternLM2's sentencepiece): json_object and json_schema replies (streamed
and not, with an image) parse and validate with `jsonschema`, `chat.completions.parse` fills a pydantic model, a bad
or oversized schema is a 400 naming what is wrong, and a schema compiling on the server stalls no other request."""

import base64
import json
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import List, Literal

import jsonschema
import pytest
from test_structured import CASES, FLAGS, PERSON, as_format

from server_util import IMG1, serving, user

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")


@pytest.fixture(scope="module", params=list(CASES))
def served(request, build_case):
    """(client, the served checkpoint's tokenizer) for each tokenizer kind."""
    from mlx_internvl.tokenizer import load_tokenizer

    built = build_case(CASES[request.param])
    with serving(built.original_dir, max_tokens=300) as (url, _):
        yield (openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120),
               load_tokenizer(built.original_dir))


@pytest.fixture
def client(served):
    return served[0]


def streamed_text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_json_schema_plain_and_streamed(client):
    """PERSON: a nested object, an array with minItems/maxItems, an enum, integer ranges, string lengths."""
    r = client.chat.completions.create(model="tiny", messages=[user("Describe a person.")],
                                       response_format=as_format(PERSON), temperature=1.0, seed=5)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    chunks = list(client.chat.completions.create(model="tiny", messages=[user("Who is in the picture?", IMG1)],
                                                 response_format=as_format(PERSON), stream=True, temperature=1.0,
                                                 seed=3, extra_body={"max_tiles": 1}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    jsonschema.validate(json.loads(streamed_text(chunks)), PERSON)
    chunks = list(client.chat.completions.create(model="tiny", messages=[user("Set the flags.", IMG1)],
                                                 response_format=as_format(FLAGS, strict=False), stream=True,
                                                 extra_body={"max_tiles": 1}))
    jsonschema.validate(json.loads(streamed_text(chunks)), FLAGS)


def test_json_schema_with_a_video(client):
    pytest.importorskip("av")
    from conftest import ASSETS

    video = ASSETS / "video" / "carphone_pristine.mp4"
    url = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Who is in the video?"},
                                         {"type": "video_url", "video_url": {"url": url}}]}]
    r = client.chat.completions.create(model="tiny", messages=msgs, response_format=as_format(PERSON),
                                       extra_body={"num_frames": 2, "max_tiles": 1})
    text_only = client.chat.completions.create(model="tiny", messages=[user("Who is in the video?")], max_tokens=1)
    assert r.choices[0].finish_reason == "stop" and r.usage.prompt_tokens > text_only.usage.prompt_tokens + 2
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


BOXES = {"type": "object", "additionalProperties": False, "required": ["boxes"], "properties": {
    "boxes": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "additionalProperties": False, "required": ["label", "box"],
        "properties": {"label": {"enum": ["cat", "dog"]},
                       "box": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000},
                               "minItems": 4, "maxItems": 4}}}}}}
EVENT = {"type": "object", "additionalProperties": False, "required": ["when", "kind", "size", "code"],
         "properties": {"when": {"type": "string", "format": "date"}, "kind": {"const": "meeting"},
                        "size": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 9}, {"type": "null"}]},
                        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}}


def test_four_schemas_and_a_plain_request_in_one_batch(served):
    """Five requests at once (the server's batch holds them together): four under four different schemas obey
    theirs, the fifth, without one, is plain text that is not bent into JSON."""
    client, tok = served
    schemas = [PERSON, FLAGS, BOXES, EVENT]
    no_end = {str(t): -100.0 for t in (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id) if t is not None}

    def ask(i):
        if i < len(schemas):
            return client.chat.completions.create(model="tiny", messages=[user(f"Request {i}.")], temperature=1.0,
                                                  seed=i, response_format=as_format(schemas[i]))
        return client.chat.completions.create(model="tiny", messages=[user("Say anything.")], max_tokens=80,
                                              logit_bias=no_end)

    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(ask, range(5)))
    for schema, r in zip(schemas, replies):
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema,
                            format_checker=jsonschema.FormatChecker())
    assert replies[4].choices[0].finish_reason == "length" and replies[4].usage.completion_tokens == 80
    with pytest.raises(json.JSONDecodeError):
        json.loads(replies[4].choices[0].message.content)
    with urllib.request.urlopen(str(client.base_url).replace("/v1/", "/health"), timeout=10) as f:
        health = json.load(f)
    assert health["stats"]["max_batch"] >= 5


def test_json_object_and_length(served):
    client, tok = served
    # A bias towards '"' and "}" so that the random model closes the object within max_tokens (see test_structured).
    bias = {str(tok.convert_tokens_to_ids(t)): 30.0 for t in ('"', "}")}
    r = client.chat.completions.create(model="tiny", messages=[user("Describe a person.")], logit_bias=bias,
                                       response_format={"type": "json_object"}, temperature=1.0, seed=7)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    # Cut off by max_tokens: finish_reason "length", and the content is the unfinished JSON (streamed alike).
    r = client.chat.completions.create(model="tiny", messages=[user("Describe a person.")], max_tokens=4,
                                       response_format=as_format(PERSON))
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)
    chunks = list(client.chat.completions.create(model="tiny", messages=[user("Describe a person.")], max_tokens=4,
                                                 response_format=as_format(PERSON), stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert streamed_text(chunks) == r.choices[0].message.content


class Flags(pydantic.BaseModel):
    ok: bool
    level: int
    kinds: List[Literal["a", "bb"]]


def test_parse_fills_a_pydantic_model(client):
    r = client.chat.completions.parse(model="tiny", messages=[user("Set the flags.")], response_format=Flags,
                                      temperature=1.0, seed=6)
    assert isinstance(r.choices[0].message.parsed, Flags)


def test_bad_schema_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[user("x")],
                                       response_format=as_format({"type": "object", "properties": {
                                           "a": {"type": "string", "minLength": -1}}}))
    assert "properties/a/minLength" in str(e.value) and e.value.body["param"] == "response_format"


def nested(depth):
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize("schema, needle", [
    (nested(40), "nested more than 64 levels deep"),
    ({"type": "object", "properties": {f"field_{i}": {"type": "string", "maxLength": 30 + i} for i in range(2000)}},
     "more than the limit of 64 KB"),
], ids=["deep", "large"])
def test_oversized_schema_is_a_400(client, schema, needle):
    """Refused before anything is compiled."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[user("x")], response_format=as_format(schema))
    assert needle in str(e.value) and e.value.body["param"] == "response_format"


def test_a_compiling_schema_stalls_no_one(client, monkeypatch):
    """While one request's schema compiles (held open here until the other reply is in), the server answers a
    plain request: compiling runs on a worker thread, neither on the event loop nor on the generation thread."""
    from mlx_internvl import structured

    real, gate, entered, seen = structured.compile_grammar, threading.Event(), threading.Event(), []

    def held(fmt, lltok=None):
        if (fmt.schema or {}).get("title") == "held":
            seen.append(threading.current_thread().name)
            entered.set()
            seen.append(gate.wait(timeout=40))
        return real(fmt, lltok)

    monkeypatch.setattr(structured, "compile_grammar", held)
    out = {}
    schema = dict(FLAGS, title="held")
    worker = threading.Thread(target=lambda: out.update(r=client.chat.completions.create(
        model="tiny", messages=[user("Set the flags.")], response_format=as_format(schema))))
    worker.start()
    try:
        assert entered.wait(30)
        plain = client.with_options(timeout=20).chat.completions.create(model="tiny", messages=[user("Hi.")],
                                                                         max_tokens=5)
        assert plain.choices[0].finish_reason in ("stop", "length") and "r" not in out
    finally:
        gate.set()
        worker.join(60)
    assert seen[0] != "mlx-generation" and seen[1] is True
    jsonschema.validate(json.loads(out["r"].choices[0].message.content), schema)

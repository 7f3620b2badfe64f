"""`response_format` through the server, driven by the real `openai` client: json_object and json_schema replies
(streamed and not, one with an image) parse and validate with `jsonschema`, `chat.completions.parse` fills a
pydantic model, and a bad schema is a 400 naming what is wrong."""

import json
from typing import List, Literal

import jsonschema
import pytest
from test_structured import FLAGS, PERSON, as_format

from builders import Case
from server_util import IMG1, serving, user

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")


@pytest.fixture(scope="module")
def client(build_case):
    built = build_case(Case("smoke_qwen2"))
    with serving(built.original_dir, max_tokens=300) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_json_schema_plain_and_streamed(client):
    r = client.chat.completions.create(model="tiny", messages=[user("Describe a person.")],
                                       response_format=as_format(PERSON), temperature=1.0, seed=5)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    chunks = list(client.chat.completions.create(model="tiny", messages=[user("Set the flags.", IMG1)],
                                                 response_format=as_format(FLAGS, strict=False), stream=True,
                                                 extra_body={"max_tiles": 1}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), FLAGS)


def test_json_object_and_length(client, build_case):
    from mlx_internvl.tokenizer import load_tokenizer

    tok = load_tokenizer(build_case(Case("smoke_qwen2")).original_dir)
    # A bias towards '"' and "}" so that the random model closes the object within max_tokens (see test_structured).
    bias = {str(tok.convert_tokens_to_ids(t)): 30.0 for t in ('"', "}")}
    r = client.chat.completions.create(model="tiny", messages=[user("Describe a person.")], logit_bias=bias,
                                       response_format={"type": "json_object"}, temperature=1.0, seed=7)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(model="tiny", messages=[user("Describe a person.")], max_tokens=4,
                                       response_format=as_format(PERSON))
    assert r.choices[0].finish_reason == "length"


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

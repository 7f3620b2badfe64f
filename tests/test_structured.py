"""Structured output on tiny random-weight checkpoints of both tokenizer kinds (the tiny byte-level BPE, and
InternLM2's real sentencepiece tokenizer): whatever the random model prefers, the reply must parse and validate
with `jsonschema` (a validator we did not write), streamed, batched, with an image, and from the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from conftest import ASSETS

import mlx_internvl
from builders import Case
from mlx_internvl.errors import UserError
from mlx_internvl.generate import batch_generate, stream_generate
from mlx_internvl.structured import ResponseFormat

ROOT = Path(__file__).resolve().parents[1]
CASES = {"bpe": Case("smoke_qwen2"),
         "sentencepiece": Case("st_internlm2_sp", text="internlm2", template="internlm2-chat", tokenizer="internlm2")}

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 8},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 2, "maxItems": 3},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 10},
                                   "zip": {"type": "integer", "minimum": 1000, "maximum": 99999}}},
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}
FLAGS = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "level": {"type": "integer", "minimum": -3, "maximum": 3},
                   "kinds": {"type": "array", "items": {"enum": ["a", "bb"]}, "minItems": 1, "maxItems": 4}},
    "required": ["ok", "level", "kinds"],
    "additionalProperties": False,
}


def as_format(schema, strict=True):
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": strict}}


@pytest.fixture(scope="module", params=list(CASES))
def tiny(request, build_case):
    built = build_case(CASES[request.param])
    model, processor = mlx_internvl.load(built.original_dir, dtype="float32")
    return built, model, processor


def reply(model, processor, prompt="Describe a person.", images=None, **kw):
    pieces = list(stream_generate(model, processor, prompt, images, **kw))
    return "".join(p.text for p in pieces), pieces[-1].finish_reason


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 0}, {"temperature": 1.5, "seed": 1}],
                         ids=["greedy", "t1", "t1.5"])
def test_schema_reply_validates(tiny, sampling):
    _, model, processor = tiny
    text, finish = reply(model, processor, max_tokens=300, response_format=as_format(PERSON), **sampling)
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_strict_false_and_json_object(tiny):
    _, model, processor = tiny
    text, _ = reply(model, processor, max_tokens=200, response_format=as_format(FLAGS, strict=False),
                    temperature=1.0, seed=2)
    jsonschema.validate(json.loads(text), FLAGS)
    # Any object is unbounded: a bias towards '"' and "}" makes the random model want to close strings and objects
    # (too early, unless the grammar says no), so that the reply ends within max_tokens.
    bias = {processor.tokenizer.convert_tokens_to_ids(t): 30.0 for t in ('"', "}")}
    text, finish = reply(model, processor, max_tokens=200, response_format={"type": "json_object"},
                         temperature=1.0, seed=3, logit_bias=bias)
    assert finish == "stop" and isinstance(json.loads(text), dict)


def test_image_prompt(tiny):
    _, model, processor = tiny
    text, finish = reply(model, processor, "Describe the picture.", [ASSETS / "images" / "image1.jpg"],
                         max_tiles=1, max_tokens=300, response_format=ResponseFormat(PERSON))
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_cut_off_by_max_tokens_says_length(tiny):
    _, model, processor = tiny
    text, finish = reply(model, processor, max_tokens=4, response_format=as_format(PERSON))
    assert finish == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_batch_rows_each_with_its_own_grammar(tiny):
    """Rows under different schemas obey theirs; the row without one decodes exactly as unconstrained."""
    _, model, processor = tiny
    prompts = ["Describe a person.", "Set the flags.", "Say something."]
    out = batch_generate(model, processor, prompts, max_tokens=200,
                         response_formats=[as_format(PERSON), as_format(FLAGS), None])
    jsonschema.validate(json.loads(out.texts[0]), PERSON)
    jsonschema.validate(json.loads(out.texts[1]), FLAGS)
    assert out.finish_reasons[:2] == ["stop", "stop"]
    alone = [p.token for p in stream_generate(model, processor, prompts[2], max_tokens=200)]
    free = batch_generate(model, processor, prompts[2:], max_tokens=200)
    assert out.token_ids[2] == free.token_ids[0] == [t for t in alone if t not in processor.stop_token_ids()]


def test_chat_session_turns_each_with_its_own_format(tiny):
    """A response format per turn: a JSON turn, a plain turn, a turn under another schema; each JSON reply obeys
    its schema with the conversation (and its KV cache) carried over, and goes into the history as it came."""
    from mlx_internvl.chat import ChatSession

    _, model, processor = tiny
    session = ChatSession(model, processor, max_tiles=1, max_tokens=200, temperature=1.0, seed=8)
    person = session.ask("Describe a person.", [ASSETS / "images" / "image1.jpg"], response_format=as_format(PERSON))
    jsonschema.validate(json.loads(person), PERSON)
    session.ask("Now say anything.", max_tokens=12)
    flags = session.ask("Set the flags.", response_format=ResponseFormat(FLAGS))
    jsonschema.validate(json.loads(flags), FLAGS)
    assert [a for _, a in session.history][::2] == [person, flags]
    with pytest.raises(UserError, match="invalid JSON Schema at type"):
        session.ask("x", response_format=as_format({"type": "objectx"}))
    assert len(session.history) == 3


@pytest.mark.parametrize("schema, strict, needle", [
    ({"type": "objectx"}, True, "invalid JSON Schema at type"),
    ({"type": "object", "properties": {"a": {"type": "string", "minLength": -1}}}, True,
     "invalid JSON Schema at properties/a/minLength"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}, True,
     "Unknown format: no-such-format"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, True, "Unimplemented keys"),
])
def test_bad_schema_is_a_clear_error(tiny, schema, strict, needle):
    _, model, processor = tiny
    with pytest.raises(UserError, match=needle):
        reply(model, processor, max_tokens=5, response_format=as_format(schema, strict))


def test_oversized_schema_is_a_clear_error(tiny):
    """Caps checked before the schema is: 100 nested objects would exhaust `jsonschema`'s recursion."""
    from test_structured_server import nested

    _, model, processor = tiny
    big = {"type": "object", "properties": {f"k{i}": {"enum": list(range(i, i + 40))} for i in range(500)}}
    for schema, needle in [(nested(100), "nested more than 64 levels deep"), (big, "more than the limit of 64 KB")]:
        with pytest.raises(UserError, match=needle):
            reply(model, processor, max_tokens=5, response_format=as_format(schema))


def test_bad_response_format_is_a_clear_error(tiny):
    _, model, processor = tiny
    for fmt, needle in [({"type": "xml"}, "response_format.type"), ({"type": "json_schema"}, "json_schema.schema"),
                        ("json", "must be an object")]:
        with pytest.raises(UserError, match=needle):
            reply(model, processor, max_tokens=5, response_format=fmt)


def test_strict_false_ignores_what_cannot_be_enforced(tiny):
    _, model, processor = tiny
    schema = dict(FLAGS, **{"if": {"required": ["ok"]}, "then": {"required": ["level"]}})
    text, finish = reply(model, processor, max_tokens=200, response_format=as_format(schema, strict=False))
    assert finish == "stop"
    jsonschema.validate(json.loads(text), schema)


def cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "mlx_internvl", "generate", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=180, cwd=ROOT)


def test_cli_json_schema(build_case, tmp_path):
    built = build_case(CASES["bpe"])
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(PERSON))
    r = cli("--model", built.original_dir, "--prompt", "Describe a person.", "-m", 300, "--json-schema", schema_file,
            "--temperature", 1.0, "--seed", 4)
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), PERSON)
    r = cli("--model", built.original_dir, "--prompt", "Describe a person.", "-m", 3, "--json-schema", schema_file)
    assert r.returncode == 0 and "before its JSON was complete" in r.stderr
    (tmp_path / "bad.json").write_text('{"type": "object",')
    r = cli("--model", built.original_dir, "--prompt", "x", "--json-schema", tmp_path / "bad.json")
    assert r.returncode != 0 and "bad.json is not JSON" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ["qwen2_5", "internlm2"])
def test_grammar_vocabulary_is_the_tokenizers(name):
    """llguidance's view of each real tokenizer (150k byte-level BPE, sentencepiece with byte fallback) spells every
    token of a text as the tokenizer itself decodes it, and its matcher accepts the tokenizer's own encoding of a
    document that fits the schema, token by token."""
    from mlx_internvl.structured import JsonConstraint, compile_grammar, ll_tokenizer
    from mlx_internvl.tokenizer import load_tokenizer

    tok = load_tokenizer(ASSETS / "tokenizers" / name)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    lltok = ll_tokenizer(tok, len(tok._tokenizer) + 7, [end])
    text = 'Tab\there, line\nbreak, 书生·万象, naïve 🦜 {"a": [1, 2]}'
    ids = tok.encode(text, add_special_tokens=False)
    assert lltok.decode_bytes(ids) == tok.decode(ids).encode() == text.encode()
    doc = {"name": "Zoë\nK", "age": 42, "color": "blue", "tags": ["🦜", "ab"],
           "address": {"city": "上海", "zip": 20000}}
    rule = JsonConstraint(lltok, compile_grammar(ResponseFormat(PERSON), lltok), [end])
    assert rule.matcher.consume_tokens(tok.encode(json.dumps(doc, ensure_ascii=False), add_special_tokens=False))
    assert rule.complete and rule.matcher.consume_token(end)

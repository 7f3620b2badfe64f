"""Structured output: replies constrained token by token to JSON (any object, or one matching a JSON Schema).

The grammar engine is llguidance (what mlx-vlm uses): the schema is checked against its metaschema with
`jsonschema`, compiled by llguidance into a grammar, and each sequence gets its own `llguidance.LLMatcher`. Before
every sampling step the matcher fills a bitmask of the tokens that keep the output a valid prefix; the others get
-inf. Once the JSON is complete only the end-of-turn tokens are allowed, so the reply ends there.

llguidance needs the checkpoint's own vocabulary as bytes. Fast (`tokenizers`) tokenizers, the byte-level BPE of
Qwen2.5/Qwen3 included, go through `llguidance.hf.from_tokenizer`; InternLM2's sentencepiece tokenizer is given
piece by piece (`▁` is a space, `<0xNN>` pieces are that byte, control pieces and added tokens are special).
Ids past the tokenizer (padded embedding rows) are never allowed. The JSON is laid out as `json.dumps` writes it
(`{"a": 1, "b": [2, 3]}`, no other whitespace), so a reply cannot run on in blanks.

`strict=True` compiles the schema exactly and refuses keywords llguidance cannot enforce; `strict=False` ignores
those keywords (the output still follows the rest of the schema).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence

import llguidance
import llguidance.hf
import llguidance.numpy as llnp
import mlx.core as mx
import numpy as np
from jsonschema import SchemaError
from jsonschema.validators import validator_for
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .errors import UserError

_ANY_OBJECT = {"type": "object"}
# One layout, `{"a": 1, "b": [2, 3]}` (json.dumps'): free whitespace lets a model loop on blanks until max_tokens.
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ResponseFormat:
    """What the reply must be: a JSON object matching `schema` (None: any JSON object)."""

    schema: Optional[dict] = None
    strict: bool = True

    @classmethod
    def parse(cls, value) -> Optional[ResponseFormat]:
        """A `ResponseFormat` from itself, None, or an OpenAI `response_format` dict (`{"type": "text"}`,
        `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"schema": ..., "strict": ...}}`)."""
        if value is None or isinstance(value, ResponseFormat):
            return value
        if not isinstance(value, dict) or "type" not in value:
            raise UserError(f"response_format must be an object with a 'type', got {value!r}")
        kind = value["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return cls()
        if kind != "json_schema":
            raise UserError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise UserError("response_format of type 'json_schema' needs json_schema.schema, a JSON Schema object")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise UserError(f"response_format.json_schema.strict must be true or false, got {strict!r}")
        return cls(spec["schema"], bool(strict) if strict is not None else False)


def check_schema(schema) -> None:
    """A UserError naming the offending part unless `schema` is a valid JSON Schema (its own metaschema)."""
    if not isinstance(schema, dict):
        raise UserError(f"the JSON Schema must be an object, got {type(schema).__name__}")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise UserError(f"invalid JSON Schema at {where}: {e.message}") from e


def compile_grammar(fmt: ResponseFormat, tokenizer: Optional[llguidance.LLTokenizer] = None) -> str:
    """llguidance's grammar for `fmt`; a UserError when the schema is invalid or uses what llguidance cannot
    enforce under `strict`."""
    schema = _ANY_OBJECT if fmt.schema is None else fmt.schema
    check_schema(schema)
    overrides = dict(LAYOUT) if fmt.strict else dict(LAYOUT, lenient=True)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=overrides)
    except ValueError as e:
        raise UserError(f"cannot use this JSON Schema: {e}") from e
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if error:
        hint = " (pass strict=false to ignore keywords that cannot be enforced)" if fmt.strict else ""
        raise UserError(f"unsupported JSON Schema: {error}{hint}")
    return grammar


class _SentencePieceVocab:
    """The shape llguidance's `TokenizerWrapper` reads: every id's bytes, the special ids, and an encoder."""

    def __init__(self, hf, n_vocab: int):
        sp = hf.sp_model
        self.tokens, self.special_token_ids = [], []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                self.tokens.append(bytes([int(piece[3:5], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                self.tokens.append(piece.encode())
                self.special_token_ids.append(i)
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())
        added = {i: t.content for i, t in hf.added_tokens_decoder.items() if i >= len(self.tokens)}
        for i in range(len(self.tokens), max(n_vocab, max(added, default=-1) + 1)):
            self.tokens.append(added.get(i, f"<unused_{i}>").encode())
            self.special_token_ids.append(i)
        self.eos_token_id = hf.eos_token_id
        self.bos_token_id = hf.bos_token_id
        self._hf = hf

    def __call__(self, text: str):
        return self._hf.encode(text, add_special_tokens=False)


_CACHE: dict = {}


def ll_tokenizer(tokenizer, n_vocab: int, stop_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """llguidance's view of the checkpoint's tokenizer (an mlx-lm `TokenizerWrapper` or a transformers tokenizer)
    over `n_vocab` logits, ending on `stop_ids`. Built once per tokenizer (about a second for 150k tokens)."""
    hf = tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer
    key = (id(hf), n_vocab, tuple(sorted(stop_ids)))
    if key not in _CACHE:
        stops = sorted(stop_ids) or None
        if hasattr(hf, "backend_tokenizer"):
            _CACHE[key] = llguidance.hf.from_tokenizer(hf, n_vocab=n_vocab, eos_token=stops)
        elif hasattr(hf, "sp_model"):
            vocab = llguidance.TokenizerWrapper(_SentencePieceVocab(hf, n_vocab))
            _CACHE[key] = llguidance.LLTokenizer(vocab, n_vocab=n_vocab, eos_token=stops)
        else:
            raise UserError(f"structured output needs a tokenizers (fast) or sentencepiece tokenizer, got "
                            f"{type(hf).__name__}")
    return _CACHE[key]


class JsonConstraint:
    """An mlx-lm logits processor for one sequence: tokens that would break `grammar` get -inf.

    Each call after the first follows a sampled token (mlx-lm passes the sequence so far; its last token is the
    one sampled at the previous step), which advances the matcher before the next mask is computed."""

    def __init__(self, lltok: llguidance.LLTokenizer, grammar: str, stop_ids: Sequence[int]):
        self.matcher = llguidance.LLMatcher(lltok, grammar)
        if self.matcher.is_error():
            raise UserError(f"unsupported JSON Schema: {self.matcher.get_error()}")
        self.mask = llnp.allocate_token_bitmask(1, lltok.vocab_size)
        self.stop_ids = sorted(stop_ids)
        self.steps = 0
        self._bits = mx.arange(32, dtype=mx.uint32)

    @property
    def complete(self) -> bool:
        """Whether the output so far is a whole JSON value the grammar accepts."""
        return self.matcher.is_accepting()

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.steps:
            self.matcher.consume_token(int(tokens[-1].item()))
        self.steps += 1
        vocab = logits.shape[-1]
        if self.matcher.is_stopped() or self.matcher.is_error():
            # Past the end (or a token forced in from outside): only the end-of-turn tokens remain.
            allowed = mx.zeros((vocab,), dtype=mx.bool_)
            allowed[mx.array(self.stop_ids)] = True
        else:
            llnp.fill_next_token_bitmask(self.matcher, self.mask)
            words = mx.array(self.mask[0].view(np.uint32))
            allowed = ((words[:, None] >> self._bits) & 1).reshape(-1).astype(mx.bool_)
            n = allowed.shape[0]
            allowed = allowed[:vocab] if n >= vocab else mx.concatenate([allowed, mx.zeros((vocab - n,), mx.bool_)])
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))


@dataclass(frozen=True)
class Grammar:
    """A ready llguidance grammar (Lark text) the reply must follow, e.g. `tools.call_grammar`'s."""

    lark: str


def constraint(model, processor, fmt, stop_ids: Sequence[int]) -> Optional[JsonConstraint]:
    """A fresh `JsonConstraint` for one request of `model` (None when `fmt` asks for plain text). `fmt` is a
    `ResponseFormat`, a `Grammar`, an OpenAI `response_format` dict or None."""
    if not isinstance(fmt, Grammar):
        fmt = ResponseFormat.parse(fmt)
    if fmt is None:
        return None
    n_vocab = int(model.config.llm_config["vocab_size"])
    lltok = ll_tokenizer(processor.tokenizer, n_vocab, stop_ids)
    if isinstance(fmt, Grammar):
        error = llguidance.LLMatcher.validate_grammar(fmt.lark, lltok)
        if error:
            raise UserError(f"cannot constrain the reply: {error}")
        return JsonConstraint(lltok, fmt.lark, stop_ids)
    return JsonConstraint(lltok, compile_grammar(fmt, lltok), stop_ids)


def load_schema_file(path) -> ResponseFormat:
    """The JSON Schema in the file at `path`, as a strict `ResponseFormat`; a UserError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read the JSON Schema file {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    check_schema(schema)
    return ResponseFormat(schema)

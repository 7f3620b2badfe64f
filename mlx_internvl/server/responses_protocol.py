"""OpenAI's Responses API request, translated into the chat-completions request the rest of the server runs.

A `POST /v1/responses` body is validated here (pydantic, strict, as `protocol.py`) and turned into one
`ChatRequest`: `instructions` becomes the system message, the stored conversation of `previous_response_id`
comes next, then `input` (a string, or message items whose `input_text` / `input_image` / `output_text` parts map
one to one onto chat parts). `max_output_tokens`, `temperature`, `top_p`, `text.format` and `reasoning.effort`
become their chat fields, so the ranges, budgets, JSON Schema checks, caches and the engine are the chat path's
own. What the chat path then refuses is renamed back to the Responses field it came from (`messages.3.content.1`
is `input.2.content.1` when `instructions` came first), so an error names what the client sent.

`ResponseStore` keeps finished responses for `previous_response_id` and `GET /v1/responses/{id}`: a bounded
count and bytes (the conversation's JSON, images' data URLs included), oldest out first. Only the event loop
touches it, so it needs no lock.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from .protocol import APIError, ChatRequest, parse_request


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class InputImage(_Strict):
    type: Literal["input_image"]
    image_url: Optional[str] = None
    file_id: Optional[str] = None
    detail: Optional[str] = None


class OutputText(_Strict):  # an earlier reply, as the client sends `response.output` back
    type: Literal["output_text"]
    text: str


class Refusal(_Strict):
    type: Literal["refusal"]
    refusal: str


Content = Annotated[Union[InputText, InputImage, OutputText, Refusal], Field(discriminator="type")]


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, List[Content]]


class ReasoningItem(_Strict):  # an earlier reply's reasoning: not fed back, as the chat page keeps only answers
    type: Literal["reasoning"]


class FunctionCallItem(_Strict):  # an earlier reply's call, as `response.output` comes back
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[bool] = None


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str


def _item_type(value) -> Optional[str]:
    return value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)


Item = Annotated[Union[Annotated[MessageItem, Tag("message")], Annotated[ReasoningItem, Tag("reasoning")],
                       Annotated[FunctionCallItem, Tag("function_call")],
                       Annotated[FunctionOutputItem, Tag("function_call_output")]], Discriminator(_item_type)]


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = None
    schema_: Optional[dict] = Field(None, alias="schema")
    strict: Optional[bool] = None


class TextConfig(_Strict):
    format: Optional[TextFormat] = None


class Reasoning(_Strict):
    effort: Optional[Literal["none", "minimal", "low", "medium", "high", "xhigh"]] = None
    summary: Optional[str] = None


class ResponsesRequest(_Strict):
    model: str
    input: Union[str, List[Item]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None  # ranges are the chat request's (checked there)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    text: Optional[TextConfig] = None
    stream: bool = False
    store: bool = True
    previous_response_id: Optional[str] = None
    reasoning: Optional[Reasoning] = None
    metadata: Optional[Dict[str, str]] = None
    tools: Optional[List[FunctionTool]] = None
    tool_choice: Union[Literal["auto", "none", "required"], NamedFunction, None] = None
    parallel_tool_calls: Optional[bool] = None
    background: Optional[bool] = None
    conversation: Union[str, dict, None] = None
    # InternVL extras and a seed (the openai client sends them with extra_body=...)
    max_tiles: Optional[int] = None
    num_frames: Optional[int] = None
    seed: Optional[int] = None


_FIELDS = {name for m in (InputText, InputImage, OutputText, Refusal, MessageItem, TextFormat, TextConfig,
                          Reasoning, ResponsesRequest, FunctionCallItem, FunctionOutputItem, FunctionTool,
                          NamedFunction) for name in m.model_fields} | {"schema"}


def _path(loc) -> str:
    """A pydantic error location as the client wrote it: union-branch labels dropped, `schema_` as `schema`."""
    return ".".join(str(p).rstrip("_") for p in loc if isinstance(p, int) or str(p).rstrip("_") in _FIELDS)


def parse_responses(raw: bytes) -> ResponsesRequest:
    """A validated `ResponsesRequest`, or an `APIError(400)` naming the first bad field."""
    try:
        return ResponsesRequest.model_validate_json(raw)
    except ValidationError as e:
        errs = e.errors()
        if errs[0]["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON ({errs[0]['msg'].removeprefix('Invalid JSON: ')})",
                           None, "invalid_json") from None
        if errs[0]["type"] == "model_type" and not errs[0]["loc"]:
            raise APIError(400, "the request body must be a JSON object", None, "invalid_json") from None
        # of the branches of a union, the one that got furthest says what is wrong
        err = max(errs, key=lambda x: (len(_path(x["loc"]).split(".")), x["type"] == "union_tag_invalid",
                                       x["loc"][-1] == "type"))
        param = _path(err["loc"])
        if err["type"] == "union_tag_invalid":
            msg = (f"type {err['ctx']['tag']!r} is not accepted here; this server accepts "
                   f"{err['ctx']['expected_tags']}")
        elif param.startswith("tool_choice"):
            param, msg = "tool_choice", 'expected "auto", "none", "required" or {"type": "function", "name": ...}'
        elif err["type"] == "literal_error" and param.endswith(".type"):
            param = param.removesuffix(".type")
            msg = f"type {err['input']!r} is not accepted here; this server accepts {err['ctx']['expected']}"
        elif param == "input" and len(errs) > 1:
            msg = "expected a string or a list of input items"
        else:
            msg = err["msg"]
        code = "unsupported_value" if "type {" in msg or "type '" in msg else (
            "invalid_type" if "type" in err["type"] else "invalid_value")
        raise APIError(400, f"{param}: {msg}" if param else msg, param or None, code) from None


def _refuse(body: ResponsesRequest) -> None:
    """Fields whose silent omission would change the answer."""
    if body.background:
        raise APIError(400, "background: this server answers within the request; send background=false or leave "
                            "it out", "background", "unsupported_value")
    if body.conversation is not None:
        raise APIError(400, "conversation: this server keeps no conversation objects; chain responses with "
                            "previous_response_id instead", "conversation", "unsupported_value")


def _message(item: MessageItem, where: str) -> dict:
    """A chat message from a message item; parts map one to one (so error paths keep their part index)."""
    if isinstance(item.content, str):
        return {"role": item.role, "content": item.content}
    parts = []
    for j, p in enumerate(item.content):
        if isinstance(p, InputImage):
            if p.image_url is None:
                why = "images by file_id need a file store, which this server has not" if p.file_id else "missing"
                raise APIError(400, f"{where}.content.{j}.image_url: {why}; send image_url as a data: URL (or an "
                                    "http(s) URL where the server allows remote images)",
                               f"{where}.content.{j}.image_url", "invalid_value")
            parts.append({"type": "image_url", "image_url": {"url": p.image_url, "detail": p.detail}})
        else:
            parts.append({"type": "text", "text": p.refusal if isinstance(p, Refusal) else p.text})
    return {"role": item.role, "content": parts}


def _response_format(fmt: Optional[TextFormat]) -> Optional[dict]:
    if fmt is None or fmt.type != "json_schema":
        return None if fmt is None else {"type": fmt.type}
    if fmt.schema_ is None:
        raise APIError(400, "text.format.schema: a json_schema format needs a JSON Schema object", "text.format.schema",
                       "invalid_value")
    return {"type": "json_schema", "json_schema": {"name": fmt.name or "reply", "schema": fmt.schema_,
                                                   "strict": fmt.strict}}


def _items(items) -> tuple:
    """(chat messages, the input path of each) of input items: a function call joins the assistant message before
    it (or makes one), its output is a tool message."""
    out, origins = [], []
    for k, it in enumerate(items):
        if isinstance(it, ReasoningItem):
            continue
        if isinstance(it, FunctionCallItem):
            call = {"id": it.call_id, "type": "function", "function": {"name": it.name, "arguments": it.arguments}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
                continue
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
        elif isinstance(it, FunctionOutputItem):
            message = {"role": "tool", "tool_call_id": it.call_id, "content": it.output}
        else:
            message = _message(it, f"input.{k}")
        out.append(message)
        origins.append(f"input.{k}")
    return out, origins


@dataclass
class Translated:
    """A Responses request as the chat path runs it."""

    body: ResponsesRequest
    chat: ChatRequest
    conversation: List[dict]  # the chat messages to keep for a next turn (no instructions: they are not carried)
    origins: List[str]  # the Responses field each chat message came from


def translate(raw: bytes, store: ResponseStore, vocab_size: int) -> Translated:
    """The `ChatRequest` for a Responses body; an `APIError` naming the Responses field for anything wrong."""
    body = parse_responses(raw)
    _refuse(body)
    history: List[dict] = []
    if body.previous_response_id is not None:
        history = store.conversation(body.previous_response_id)
    if isinstance(body.input, str):
        new, new_origins = [{"role": "user", "content": body.input}], ["input"]
    else:
        new, new_origins = _items(body.input)
    system = [{"role": "system", "content": body.instructions}] if body.instructions is not None else []
    origins = ["instructions"] * len(system) + ["previous_response_id"] * len(history) + new_origins
    effort = body.reasoning.effort if body.reasoning else None
    fields = {"model": body.model, "messages": system + history + new, "stream": body.stream,
              "max_completion_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
              "response_format": _response_format(body.text.format if body.text else None),
              "reasoning_effort": "high" if effort == "xhigh" else effort, "max_tiles": body.max_tiles,
              "num_frames": body.num_frames, "seed": body.seed, "parallel_tool_calls": body.parallel_tool_calls,
              "tools": [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                        for t in body.tools] if body.tools else None,
              "tool_choice": {"type": "function", "function": {"name": body.tool_choice.name}}
              if isinstance(body.tool_choice, NamedFunction) else body.tool_choice}
    try:
        chat = parse_request({k: v for k, v in fields.items() if v is not None}, vocab_size)
    except APIError as e:
        raise rename(e, origins) from None
    return Translated(body, chat, history + new, origins)


_CHAT_NAMES = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format",
               "reasoning_effort": "reasoning.effort"}


def rename(e: APIError, origins: List[str]) -> APIError:
    """The chat path's error with its field names as the Responses request spells them."""
    def one(m: re.Match) -> str:
        if m.group(1) is not None:
            i = int(m.group(1))
            return origins[i] if i < len(origins) else "input"
        return _CHAT_NAMES.get(m.group(0), "input")

    pattern = r"\bmessages(?:\.(\d+))?\b|\b(?:max_completion_tokens|response_format|reasoning_effort)\b"
    param = re.sub(pattern, one, e.param) if e.param else e.param
    return APIError(e.status, re.sub(pattern, one, e.message), param, e.code)


@dataclass
class Stored:
    conversation: List[dict]  # chat messages, this response's reply last
    response: dict  # the Response object, as answered
    nbytes: int


class ResponseStore:
    """The last responses kept (`store` true): at most `max_entries`, `max_bytes` of JSON in all (a response
    larger than that is not kept); the oldest leave first."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, rid: str, conversation: List[dict], response: dict) -> None:
        n = len(json.dumps(conversation)) + len(json.dumps(response))
        if n > self.max_bytes or self.max_entries == 0:
            return
        self._items[rid] = Stored(conversation, response, n)
        self.nbytes += n
        while len(self._items) > self.max_entries or self.nbytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.nbytes -= dropped.nbytes

    def get(self, rid: str) -> Optional[Stored]:
        return self._items.get(rid)

    def delete(self, rid: str) -> bool:
        item = self._items.pop(rid, None)
        if item is not None:
            self.nbytes -= item.nbytes
        return item is not None

    def conversation(self, rid: str) -> List[dict]:
        """The stored conversation of `rid` (for previous_response_id), or a 400 naming it."""
        item = self._items.get(rid)
        if item is None:
            raise APIError(400, f"previous_response_id: no stored response {rid!r} (it was never made here, was made "
                                f"with store=false, or was evicted: this server keeps the last {self.max_entries} "
                                "responses within --response-store-bytes)", "previous_response_id",
                           "previous_response_not_found")
        return list(item.conversation)

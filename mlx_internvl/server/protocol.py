"""The OpenAI chat-completions request, validated, and the response objects, shaped as the `openai` package's types.

Requests are checked field by field before anything reaches the model; every problem becomes an `APIError` that
the app answers as OpenAI-shaped JSON (`{"error": {"message", "type", "param", "code"}}`). Pydantic runs in strict
mode so `"max_tokens": "5"` is a wrong type, not a number. Unknown top-level fields are ignored, as most
OpenAI-compatible servers do, except those whose silent omission would change the answer (`n` > 1): those are
refused; `json_format` reads `response_format` (an invalid or unenforceable JSON Schema is a 400), `tools.py`
the tools.
The body is parsed by pydantic's own JSON parser alone: it has a nesting limit and a digit limit of its own and
never recurses in Python, so a body nested 10,000 deep or a 5,000-digit number is a 400, not a RecursionError.
Integer fields take their ranges from `sampling.INT_RANGES`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UserError
from ..sampling import COUNT_MAX, INT_RANGES, parse_token_id
from ..structured import ResponseFormat as JsonFormat


class APIError(Exception):
    """An error answered to the client: HTTP `status` and OpenAI's error body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 408: "invalid_request_error", 413: "invalid_request_error",
             415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class URLRef(_Strict):
    url: str
    detail: Optional[str] = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: URLRef


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: URLRef


Part = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(_Strict):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[Part], None] = None
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCallIn]] = None  # assistant messages
    tool_call_id: Optional[str] = None  # tool messages


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    type: str


class TemplateKwargs(_Strict):
    enable_thinking: Optional[bool] = None


# OpenAI's reasoning_effort levels: "none"/"minimal" ask for (next to) no reasoning, so thinking is off; "low",
# "medium" and "high" ask for reasoning, and InternVL3.5 has one thinking mode, so they all turn it on.
EFFORT_THINKS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}


class ChatRequest(_Strict):
    model: str
    messages: List[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, ge=INT_RANGES["max_tokens"][0], le=INT_RANGES["max_tokens"][1])
    max_completion_tokens: Optional[int] = Field(None, ge=INT_RANGES["max_tokens"][0],
                                                 le=INT_RANGES["max_tokens"][1])
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=INT_RANGES["seed"][0], le=INT_RANGES["seed"][1])
    stop: Union[str, List[str], None] = None
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    logit_bias: Optional[Dict[str, float]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    n: Optional[int] = Field(None, ge=1, le=COUNT_MAX)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list] = None  # checked by server/tools.py (rendered as sent)
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: Optional[bool] = None
    # InternVL extras (the openai client sends them with extra_body=...)
    max_tiles: Optional[int] = Field(None, ge=1, le=40)
    num_frames: Optional[int] = Field(None, ge=1, le=64)
    # Thinking, as clients send it: OpenAI's reasoning_effort, the chat_template_kwargs of vLLM/SGLang, and vLLM's
    # thinking_token_budget.
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = None
    chat_template_kwargs: Optional[TemplateKwargs] = None
    thinking_token_budget: Optional[int] = Field(None, ge=0)

    def thinking(self, default: Optional[bool]) -> Optional[bool]:
        """Thinking on/off for this request: `chat_template_kwargs.enable_thinking`, else `reasoning_effort`, else
        the server's default; a contradiction between the two fields is a 400."""
        kw = self.chat_template_kwargs.enable_thinking if self.chat_template_kwargs else None
        effort = EFFORT_THINKS.get(self.reasoning_effort) if self.reasoning_effort else None
        if kw is not None and effort is not None and kw != effort:
            raise APIError(400, f"chat_template_kwargs.enable_thinking={str(kw).lower()} contradicts "
                                f"reasoning_effort={self.reasoning_effort!r}; send one of them", "reasoning_effort",
                           "invalid_value")
        return next((v for v in (kw, effort) if v is not None), default)

    def reasoning_level(self) -> Optional[str]:
        """GPT-OSS (harmony): the level `reasoning_effort` asks for (low, medium, high), which goes in the system
        message; the <think> switch (`enable_thinking`, efforts "none"/"minimal") has no meaning there: a 400."""
        kw = self.chat_template_kwargs.enable_thinking if self.chat_template_kwargs else None
        if kw is not None or self.reasoning_effort in ("none", "minimal"):
            raise APIError(400, "this model (GPT-OSS) always reasons in its analysis channel; send reasoning_effort "
                                "low, medium or high to set how much, not enable_thinking or "
                                f"reasoning_effort={self.reasoning_effort!r}", "reasoning_effort", "unsupported_value")
        return self.reasoning_effort

    @property
    def token_bias(self) -> Optional[Dict[int, float]]:
        """`logit_bias` with its keys as token ids (checked by `parse_request`)."""
        return {parse_token_id(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None

    @property
    def stop_strings(self) -> List[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def json_format(req: ChatRequest) -> Optional[JsonFormat]:
    """The request's JSON format (None for plain text): a 400 when `response_format` is malformed. The schema
    itself is checked when it is compiled, on a worker thread (`format_error` words that 400)."""
    if req.response_format is None:
        return None
    try:
        return JsonFormat.parse(req.response_format.model_dump())
    except UserError as e:
        raise format_error(e) from None


def format_error(e: UserError) -> APIError:
    """The 400 of an invalid, too large or unenforceable JSON Schema."""
    return APIError(400, str(e), "response_format", "invalid_value")


def parse_request(raw: Union[bytes, dict], vocab_size: int) -> ChatRequest:
    """A validated `ChatRequest` from the request body (or its fields as a dict), or an `APIError(400)` naming the
    first bad field."""
    try:
        req = ChatRequest.model_validate(raw) if isinstance(raw, dict) else ChatRequest.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"])
        if err["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON ({err['msg'].removeprefix('Invalid JSON: ')})",
                           None, "invalid_json") from None
        if not param and err["type"] == "model_type":
            raise APIError(400, "the request body must be a JSON object", None, "invalid_json") from None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param or None,
                       "invalid_type" if "type" in err["type"] else "invalid_value") from None
    if req.n not in (None, 1):
        raise APIError(400, f"n={req.n} is not supported: this server returns exactly one choice (n=1)", "n",
                       "unsupported_value")
    if len(req.stop_strings) > 4 or any(not s for s in req.stop_strings):
        raise APIError(400, "stop: at most 4 non-empty strings", "stop", "invalid_value")
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs", "invalid_value")
    for k, v in (req.logit_bias or {}).items():
        try:
            parse_token_id(k, vocab_size)
        except UserError as e:
            raise APIError(400, str(e), "logit_bias", "invalid_value") from None
        if not -100.0 <= v <= 100.0:
            raise APIError(400, f"logit_bias[{k}]: {v} is outside [-100, 100]", "logit_bias", "invalid_value")
    return req


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def logprob_entries(items) -> Optional[dict]:
    """OpenAI's `logprobs` object from [(token_text, logprob, [(text, logprob), ...]), ...]."""
    if items is None:
        return None

    def one(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(one(t, lp), top_logprobs=[one(tt, tlp) for tt, tlp in top]) for t, lp, top in items],
            "refusal": None}


def completion(cid: str, model: str, text: str, finish_reason: str, use: dict, logprobs=None,
               reasoning: str = "", tool_calls: Optional[list] = None) -> dict:
    """`text` is the answer; `reasoning` (the think block's text), when there is any, is `reasoning_content`;
    `tool_calls` the calls (OpenAI's objects), when there are any."""
    message = {"role": "assistant", "content": text, "refusal": None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": finish_reason, "logprobs": logprob_entries(logprobs)}],
            "usage": use}


def chunk(cid: str, model: str, created: int, delta: dict, finish_reason: Optional[str] = None, logprobs=None,
          include_usage: bool = False) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                        "logprobs": logprob_entries(logprobs)}]}
    if include_usage:
        out["usage"] = None
    return out


def usage_chunk(cid: str, model: str, created: int, use: dict) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": use}

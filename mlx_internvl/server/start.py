"""What every generating route (chat completions, responses) does before its reply, in one place: the key, the
browser rules, a generation slot (taken before the body is read, so at most decode_concurrency + max_queue bodies
are held at once), the body under its size and time limits, the request parsed into a `ChatRequest`, its thinking
switch and budget, sampling, JSON constraint and tools checked, the prompt rendered within its budget (off the event
loop), and the job submitted to the engine. The route only shapes the reply from the job's events.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from ..errors import UserError
from ..structured import constraint
from ..thinking import think_token_ids
from .engine import Job
from .guard import check_browser
from .protocol import APIError, ChatRequest, format_error, json_format
from .replies import Events
from .tools import ToolSetup, request_tools


@dataclass
class Started:
    """A submitted request: what was asked, its job, its events and the first of them (not an error)."""

    req: ChatRequest
    job: Job
    events: Events
    first: tuple
    tools: Optional[ToolSetup] = None


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, or a 413 past `limit`, or a 408 when it takes longer than `timeout_s`. A moderately oversized body
    is read to its end (and dropped) before the answer, so that clients which send the whole body before reading
    get the 413 instead of a broken pipe."""
    too_big = APIError(413, f"the request body is larger than this server's limit of {limit >> 20} MB "
                            "(--max-request-mb)", None, "request_too_large")
    if int(request.headers.get("content-length") or 0) > 8 * limit:
        raise too_big
    body, total = bytearray(), 0
    try:
        async with asyncio.timeout(timeout_s):
            async for block in request.stream():
                total += len(block)
                if total > 8 * limit:
                    break
                if total <= limit:
                    body += block
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s", None,
                       "request_timeout") from None
    except ClientDisconnect:  # nobody reads the answer; it only keeps the log free of a traceback
        raise APIError(400, "the client closed the connection before the end of the body", None,
                       "client_disconnected") from None
    if total > limit:
        raise too_big
    return bytes(body)


def _compile(st, fmt):
    """The request's constraint (a JSON format or a tool-call grammar), compiled for the served model."""
    processor = st.engine.processor
    try:
        return constraint(st.engine.model, processor, fmt, processor.stop_token_ids())
    except UserError as e:
        raise format_error(e) from None


async def _prepare(request: Request, st, parse: Callable[[bytes], ChatRequest]
                   ) -> Tuple[ChatRequest, Optional[ToolSetup], Job]:
    arrived = time.monotonic()
    req = parse(await read_body(request, st.limit, st.cfg.body_timeout_s))
    if req.model != st.cfg.model_name:
        raise APIError(404, f"model {req.model!r} is not served here; this server serves {st.cfg.model_name!r}",
                       "model", "model_not_found")
    if st.renderer.processor.template.decode_special:  # GPT-OSS: a reasoning level, no <think> switch
        thinking, reasoning = st.cfg.thinking, req.reasoning_level()
    else:
        thinking, reasoning = req.thinking(st.cfg.thinking), None
    budget = st.cfg.thinking_budget if req.thinking_token_budget is None else req.thinking_token_budget
    if budget is not None:
        try:
            think_token_ids(st.renderer.processor.tokenizer)
        except UserError as e:
            raise APIError(400, str(e), "thinking_token_budget", "unsupported_value") from None
    processor = st.renderer.processor
    sampling, fmt, tools = st.sampling(req, thinking), json_format(req), request_tools(req, processor)
    if tools is not None and tools.forced:
        fmt = tools.grammar(processor)
    # The size caps, the schema check and the compile (seconds for a large schema) on a worker thread: they hold up
    # neither the event loop nor the batch.
    rule = None if fmt is None else await anyio.to_thread.run_sync(_compile, st, fmt)
    prompt = await anyio.to_thread.run_sync(st.renderer.render, req, thinking, tools, reasoning)
    return req, tools, Job(prompt, sampling, None, req.stop_strings, req.top_logprobs or 0 if req.logprobs else None,
                           thinking_budget=budget, response_format=fmt, rule=rule, arrived=arrived,
                           keep_tokens=tools.keep_tokens(processor) if tools else frozenset())


async def start(request: Request, st, parse: Callable[[bytes], ChatRequest]) -> Union[Started, JSONResponse]:
    """Admit, parse (`parse(body)`: a `ChatRequest` or an APIError), render and submit a request; an `APIError`
    for what is refused, a 499 response when the client left before the first event."""
    st.check_key(request)
    check_browser(request, st.cfg.allowed_origins, st.loopback_names)
    if not st.engine.try_reserve():
        raise APIError(503, "the server is busy (all generation slots and the queue are full); retry shortly",
                       None, "server_busy")
    try:
        req, tools, job = await _prepare(request, st, parse)
    except BaseException:
        st.engine.release()
        raise
    events = Events(request, st)
    job.emit, events.job = events.emit, job
    st.engine.submit(job)
    try:
        first = await events.next()
    except asyncio.TimeoutError:  # the client left
        return JSONResponse({}, status_code=499)
    if first[0] == "error":
        raise first[1]
    return Started(req, job, events, first, tools)

"""A chat completion's reply, from the engine's events: one `chat.completion`, or SSE chunks.

`Events` carries a job's events from the generation thread to the request's event loop and notices a client that
went away, a stopped engine, or the server's shutdown deadline (`st.shutdown_at`).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Optional

from fastapi import Request
from fastapi.responses import JSONResponse
from fastapi.sse import format_sse_event

from ..thinking import reply_parser, split_reasoning
from .engine import Job
from .protocol import APIError, chunk, completion, new_id, usage_chunk
from .tools import call_deltas, call_objects


class Events:
    """A job's events, from the generation thread to this request's event loop."""

    def __init__(self, request: Request, st):
        self.request, self.server, self.engine, self.job = request, st, st.engine, None
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def emit(self, ev) -> None:  # called on the generation thread
        if ev[0] in ("done", "error"):
            self.engine.release()
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

    async def next(self):
        while True:  # wake up now and then to notice a client that went away, or a shutdown
            end = self.server.shutdown_at
            if end is not None and time.monotonic() >= end:
                self.job.cancelled.set()
                return ("error", APIError(503, "the server is shutting down; the reply was cut", None,
                                          "server_shutdown"))
            try:
                return await asyncio.wait_for(self.queue.get(), 0.5)
            except asyncio.TimeoutError:
                if not self.engine.alive:
                    raise APIError(503, "the generation thread has stopped; restart the server", None,
                                   "engine_stopped") from None
                if await self.request.is_disconnected():
                    self.job.cancelled.set()
                    raise


async def collect(ev, events: Events, model: str, req, tools=None, template=None):
    """The whole reply as one `chat.completion`; with `tools` (a `tools.ToolSetup`), its calls as `tool_calls`."""
    text, logprobs = "", []
    while True:
        if ev[0] == "delta":
            text += ev[1]
            logprobs += ev[2]
        elif ev[0] == "done":
            reasoning, answer = split_reasoning(text, template=template)
            parser, calls, reason = tools.parser() if tools else None, [], ev[1]
            if parser is not None:
                answer = "".join(e[1] for e in parser.feed(answer) + parser.finish() if e[0] == "content").strip()
                calls = parser.calls
                reason = "tool_calls" if calls and reason == "stop" else reason
            return completion(new_id(), model, answer or (None if calls else ""), reason, ev[2],
                              logprobs if req.logprobs else None, reasoning, call_objects(calls))
        else:
            raise ev[1]
        try:
            ev = await events.next()
        except asyncio.TimeoutError:
            return JSONResponse({}, status_code=499)


async def deltas(first, next_event, template=None):
    """The reply as it comes: ("text", reasoning, answer, logprobs) per engine event (the think block's text, or
    GPT-OSS's analysis channel with `template`, is reasoning), then the last event: ("done", finish_reason, usage)
    or ("error", APIError)."""
    parser, ev = reply_parser(template), first
    while True:
        if ev[0] == "delta":
            yield ("text", *parser.feed(ev[1]), ev[2])
        elif ev[0] == "done":
            yield ("text", *parser.finish(), None)
        if ev[0] != "delta":
            yield ev
            return
        ev = await next_event()


def sse(obj, event: Optional[str] = None) -> bytes:
    return format_sse_event(data_str=json.dumps(obj, ensure_ascii=False), event=event)


def _answer_delta(calls, events, reasoning: str) -> dict:
    """A chunk's delta from the reasoning text and the tool parser's events (content and call deltas)."""
    answer = "".join(e[1] for e in events if e[0] == "content")
    delta = {k: v for k, v in (("reasoning_content", reasoning), ("content", answer)) if v}
    if calls is not None and call_deltas(events):
        delta["tool_calls"] = call_deltas(events)
    return delta


async def stream(job: Job, first, next_event, cid: str, model: str, req, tools=None, template=None):
    """SSE events: a role chunk, content chunks (the think block's text as `reasoning_content` deltas, calls as
    `tool_calls` deltas: name and id first, then the arguments as written), the finish chunk, the usage chunk if
    asked, then `[DONE]`."""
    created = int(time.time())
    parser = reply_parser(template)
    calls = tools.parser() if tools else None
    with_usage = bool(req.stream_options and req.stream_options.include_usage)

    try:
        yield sse(chunk(cid, model, created, {"role": "assistant", "content": ""}, include_usage=with_usage))
        ev = first
        while True:
            if ev[0] == "delta" or ev[0] == "done":
                reasoning, answer = parser.feed(ev[1]) if ev[0] == "delta" else parser.finish()
                events = [("content", answer)] if calls is None else calls.feed(answer) + (
                    calls.finish() if ev[0] == "done" else [])
                delta = _answer_delta(calls, events, reasoning)
                lp = ev[2] if req.logprobs and ev[0] == "delta" else None
                if delta or lp:
                    yield sse(chunk(cid, model, created, delta or {"content": ""}, None, lp,
                                    include_usage=with_usage))
            if ev[0] == "done":
                reason = "tool_calls" if calls is not None and calls.calls and ev[1] == "stop" else ev[1]
                yield sse(chunk(cid, model, created, {}, reason, include_usage=with_usage))
                if with_usage:
                    yield sse(usage_chunk(cid, model, created, ev[2]))
                break
            elif ev[0] == "error":  # an error after the stream started: OpenAI's streams carry it as an error object
                yield sse(ev[1].body())
                break
            ev = await next_event()
        yield format_sse_event(data_str="[DONE]")
    finally:
        job.cancelled.set()  # no-op when finished; stops generation when the client went away

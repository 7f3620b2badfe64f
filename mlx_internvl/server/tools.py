"""A chat request's tools: checked (`request_tools`), shown to the model, forced by a grammar where the request
says so, and read back from the reply into OpenAI's `tool_calls` (whole or as streamed deltas).

`tool_choice`: "auto" (the default with tools) shows the tools and parses whatever calls the model writes; "none"
shows none and parses none (calls and results already in the history are still rendered); "required" and a named
function constrain the reply to calls (`tools.call_grammar`), one unless `parallel_tool_calls` (the default) and
the format allows several; `parallel_tool_calls: false` keeps at most one call under "auto" too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import List, Optional

import llguidance

from ..errors import UserError
from ..structured import Grammar
from ..templates import ASSISTANT, USER
from ..tools import (
    Tool,
    ToolCallParser,
    ToolFormat,
    call_grammar,
    marker_ids,
    parse_tool_choice,
    parse_tools,
    tool_format,
)
from .protocol import APIError, ChatRequest


@dataclass
class ToolSetup:
    fmt: ToolFormat
    tools: List[Tool]
    mode: str  # auto | none | required | function
    name: Optional[str]  # the function of mode "function"
    parallel: bool

    @property
    def shown(self):
        """(format, tools) for the renderer when the model is shown tools, else None."""
        return (self.fmt, self.tools) if self.tools and self.mode != "none" else None

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")

    def grammar(self, processor) -> Optional[Grammar]:
        if not self.forced:
            return None
        tools = [t for t in self.tools if self.mode == "required" or t.name == self.name]
        parallel = self.parallel and self.mode == "required"
        lark = call_grammar(self.fmt, tools, parallel, marker_ids(processor, self.fmt))
        error = llguidance.LLMatcher.validate_grammar(lark, None)
        if error:  # a keyword that cannot be enforced in a strict function, say
            hint = "; set the function's strict to false to ignore what cannot be enforced"
            raise APIError(400, f"tools: cannot constrain the call to the parameters: {error.splitlines()[0]}"
                                f"{hint if any(t.strict for t in tools) else ''}", "tools", "invalid_value")
        return Grammar(lark)

    def keep_tokens(self, processor) -> frozenset:
        """The marker tokens the reply text must keep for the parser (InternLM2's are special tokens, left out of
        text otherwise, as upstream decodes)."""
        if self.shown is None:
            return frozenset()
        return frozenset(i for ids in marker_ids(processor, self.fmt) if len(ids) == 1 for i in ids)

    def parser(self) -> Optional[ToolCallParser]:
        if self.shown is None:
            return None
        return ToolCallParser(self.fmt, None if self.parallel and self.fmt.parallel else 1)


def request_tools(req: ChatRequest, processor) -> Optional[ToolSetup]:
    """The request's tools, checked before any work is done (a 400 naming the field); None without tools."""
    in_history = any(m.role == "tool" or m.tool_calls for m in req.messages)
    if not req.tools and req.tool_choice is None and not in_history:
        return None
    fmt = tool_format(processor)
    if fmt is None:
        raise APIError(400, f"tools: this checkpoint's template ({processor.template.name}) has no tool-call format",
                       "tools", "unsupported_value")
    try:
        tools = parse_tools(req.tools or [])
    except UserError as e:
        raise APIError(400, str(e), "tools", "invalid_value") from None
    try:
        mode, name = parse_tool_choice(req.tool_choice, tools)
    except UserError as e:
        raise APIError(400, str(e), "tool_choice", "invalid_value") from None
    if mode != "none" and req.response_format is not None and req.response_format.type != "text" and tools:
        raise APIError(400, "response_format: a JSON reply cannot be combined with tools; send tool_choice 'none' "
                            "or no response_format", "response_format", "unsupported_value")
    return ToolSetup(fmt, tools, mode, name, req.parallel_tool_calls is not False)


def turn(setup: Optional[ToolSetup], message, where: str, text: str):
    """(role, text) of a user, assistant or tool message: an assistant's `tool_calls` and a tool's result written
    as the model's tool format writes them."""
    if message.role == "user":
        return USER, text
    if message.role == "assistant":
        return ASSISTANT, history_calls(setup, message, where, text) if message.tool_calls else text
    return setup.fmt.result(text)


def history_calls(setup: ToolSetup, message, where: str, text: str) -> str:
    """An assistant message's text with its `tool_calls` written as the model writes calls."""
    calls = []
    for j, call in enumerate(message.tool_calls):
        try:
            calls.append((call.function.name, json.loads(call.function.arguments)))
        except json.JSONDecodeError as e:
            param = f"{where}.tool_calls.{j}.function.arguments"
            raise APIError(400, f"{param}: not JSON ({e.msg} at column {e.colno})", param, "invalid_value") from None
    try:
        return setup.fmt.assistant(text.strip(), calls)
    except UserError as e:
        raise APIError(400, f"{where}.tool_calls: {e}", f"{where}.tool_calls", "invalid_value") from None


def call_objects(calls) -> list:
    """OpenAI's `tool_calls` of a whole reply."""
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def call_deltas(events) -> list:
    """OpenAI's streamed `tool_calls` deltas from `ToolCallParser` events (content events are left out)."""
    out = []
    for ev in events:
        if ev[0] == "call":
            out.append({"index": ev[1], "id": ev[2].id, "type": "function",
                        "function": {"name": ev[2].name, "arguments": ""}})
        elif ev[0] == "arguments":
            out.append({"index": ev[1], "function": {"arguments": ev[2]}})
    return out

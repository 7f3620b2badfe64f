"""Tool (function) calls, written the way the checkpoint's language model writes them.

InternVL keeps its language model's tool format, so tools are rendered as that model's own chat template renders
them, inside InternVL's conversation template:

- `HERMES` (Qwen2.5 / Qwen3: InternVL2.5, 3 and 3.5 with a Qwen backbone, and every other ChatML template): the
  system message gets a "# Tools" section with one JSON line per tool between `<tools>` and `</tools>`; a call is
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` in the assistant turn (after its text, one per
  line); results come back in a user turn, each as `<tool_response>\\n...\\n</tool_response>`.
- `PLUGIN` (InternLM2 / InternLM2.5, recognised by its `<|plugin|>` and `<|action_start|>` tokens): InternLM's
  documented chat format: a second system turn `<|im_start|>system name=<|plugin|>` holding the functions as a
  JSON list; a call is `<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>` after the
  turn's text; its result an `<|im_start|>environment name=<|plugin|>` turn. One call per assistant turn.

JSON is written as the templates' `tojson` writes it (`json.dumps`, non-ASCII kept). `ToolCallParser` reads calls
back from generated text as it streams: text outside calls is content, and a call's arguments are given out as
they are written (its raw text), so streamed and whole replies carry the same calls. A block that never starts
like a call stays content. `call_grammar` is the llguidance grammar that forces calls (tool_choice `required` or
a named function) with arguments valid for each function's `parameters`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from mlx_lm.tool_parsers import json_tools

from .errors import UserError
from .structured import LAYOUT, check_schema
from .templates import USER

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_QWEN_TOOLS = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_QWEN_TOOLS_END = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                   "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                   '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def dumps(value) -> str:
    """JSON as the chat templates' `tojson` writes it."""
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class Tool:
    """One function the model may call; `spec` is the OpenAI tool object as sent (rendered as is)."""

    name: str
    parameters: dict
    strict: bool
    spec: dict


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as the model wrote it (or as the client sent it)
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


def parse_tools(value) -> List[Tool]:
    """OpenAI `tools` ([{"type": "function", "function": {"name", "description", "parameters", "strict"}}]) as
    `Tool`s; a UserError naming the first bad entry (`tools.1.function.name: ...`)."""
    if not isinstance(value, list):
        raise UserError(f"tools: expected a list of tools, got {type(value).__name__}")
    tools, seen = [], set()
    for i, spec in enumerate(value):
        where = f"tools.{i}"
        if not isinstance(spec, dict) or spec.get("type") != "function":
            raise UserError(f"{where}: each tool must be an object with type 'function'")
        fn = spec.get("function")
        if not isinstance(fn, dict):
            raise UserError(f"{where}.function: expected an object with the function's name and parameters")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise UserError(f"{where}.function.name: expected 1 to 64 letters, digits, '_' or '-', got {name!r}")
        if name in seen:
            raise UserError(f"{where}.function.name: {name!r} is defined twice")
        seen.add(name)
        if not isinstance(fn.get("description", ""), str):
            raise UserError(f"{where}.function.description: expected a string")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        try:
            check_schema(params)
        except UserError as e:
            raise UserError(f"{where}.function.parameters: {e}") from None
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise UserError(f"{where}.function.strict: expected true or false, got {strict!r}")
        tools.append(Tool(name, params, bool(strict), spec))
    return tools


def parse_tool_choice(value, tools: Sequence[Tool]) -> Tuple[str, Optional[str]]:
    """(mode, function name) of an OpenAI `tool_choice`: "auto", "none", "required", or
    {"type": "function", "function": {"name": ...}} (mode "function"). None means "auto" (with tools)."""
    if value is None:
        return ("auto" if tools else "none"), None
    if value in ("auto", "none", "required"):
        if value == "required" and not tools:
            raise UserError("tool_choice: 'required' needs at least one tool in tools")
        return value, None
    fn = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise UserError(f"tool_choice: expected 'auto', 'none', 'required' or "
                        f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {value!r}")
    if fn["name"] not in {t.name for t in tools}:
        raise UserError(f"tool_choice: function {fn['name']!r} is not one of tools "
                        f"({', '.join(t.name for t in tools) or 'none given'})")
    return "function", fn["name"]


@dataclass(frozen=True)
class ToolFormat:
    """How one family of language models writes tools, calls and results (see the module docstring)."""

    name: str
    start: str  # what opens a call in the assistant turn
    end: str  # what closes it
    args_key: str  # "arguments" (Qwen) or "parameters" (InternLM)
    parallel: bool  # several calls in one assistant turn

    def system(self, system: str, tools: Sequence[Tool]) -> Tuple[str, list]:
        """(the system message, messages before the conversation) with `tools` shown to the model."""
        if self.name == "plugin":
            return system, [("<|im_start|>system name=<|plugin|>\n", dumps([t.spec["function"] for t in tools]))]
        lines = "".join("\n" + dumps(t.spec) for t in tools)
        return (system + "\n\n" if system else "") + _QWEN_TOOLS + lines + _QWEN_TOOLS_END, []

    def call_text(self, name: str, arguments) -> str:
        """One call as the model writes it; `arguments` a dict (or its JSON text)."""
        args = arguments if isinstance(arguments, str) else dumps(arguments)
        body = f'{{"name": {dumps(name)}, "{self.args_key}": {args}}}'
        return f"{self.start}\n{body}\n{self.end}" if self.name == "hermes" else f"{self.start}\n{body}{self.end}"

    def assistant(self, content: str, calls: Sequence[Tuple[str, object]]) -> str:
        """An assistant turn's text: its content, then its calls [(name, arguments), ...]."""
        if len(calls) > 1 and not self.parallel:
            raise UserError(f"the {self.name} tool format has one call per assistant turn, got {len(calls)}")
        if self.name == "plugin":
            return content + "".join(self.call_text(n, a) for n, a in calls)
        return content + "".join(("\n" if content or i else "") + self.call_text(n, a) for i, (n, a) in
                                 enumerate(calls))

    def result(self, content: str) -> Tuple[object, str]:
        """(role, text) of one tool result; consecutive HERMES results are joined by a newline into one user turn."""
        if self.name == "plugin":
            return "<|im_start|>environment name=<|plugin|>\n", content
        return USER, f"<tool_response>\n{content}\n</tool_response>"


HERMES = ToolFormat("hermes", json_tools.tool_call_start, json_tools.tool_call_end, "arguments", True)
PLUGIN = ToolFormat("plugin", "<|action_start|><|plugin|>", "<|action_end|>", "parameters", False)


def tool_format(processor) -> Optional[ToolFormat]:
    """The tool format of a checkpoint (None: its template has none, e.g. Phi-3's); found once per processor."""
    if not hasattr(processor, "tool_format"):
        vocab = processor.tokenizer.get_vocab()
        processor.tool_format = (PLUGIN if "<|plugin|>" in vocab and "<|action_start|>" in vocab else
                                 HERMES if processor.template.roles[USER].startswith("<|im_start|>") else None)
    return processor.tool_format


def marker_ids(processor, fmt: ToolFormat) -> List[List[int]]:
    """The token ids of each piece of the call markers (a single id when the tokenizer has it as one token)."""
    pieces = ["<|action_start|>", "<|plugin|>", "<|action_end|>"] if fmt.name == "plugin" else [fmt.start, fmt.end]
    return [list(processor.tokenizer.encode(p, add_special_tokens=False)) for p in pieces]


def _token(text: str, ids: List[int]) -> str:
    return f"<[{ids[0]}]>" if len(ids) == 1 else json.dumps(text)


def call_grammar(fmt: ToolFormat, tools: Sequence[Tool], parallel: bool, markers: List[List[int]]) -> str:
    """The llguidance (Lark) grammar of a reply that is only calls of `tools`: one call, or with `parallel` (and a
    format that has it) one or more, each with arguments valid for its function's `parameters`."""
    if fmt.name == "plugin":
        start = _token("<|action_start|>", markers[0]) + " " + _token("<|plugin|>", markers[1])
        end, head, tail = _token("<|action_end|>", markers[2]), "\n", "}"
    else:
        start, end, head, tail = _token(fmt.start, markers[0]), _token(fmt.end, markers[1]), "\n", "}\n"
    rules = []
    for i, t in enumerate(tools):
        layout = dict(LAYOUT) if t.strict else dict(LAYOUT, lenient=True)
        schema = dict(t.parameters, **{"x-guidance": layout})
        literal = json.dumps(f'{head}{{"name": {dumps(t.name)}, "{fmt.args_key}": ')
        rules.append(f"call_{i}: {start} {literal} args_{i} {json.dumps(tail)} {end}\n"
                     f"args_{i}: %json {json.dumps(schema)}\n")
    calls = " | ".join(f"call_{i}" for i in range(len(tools)))
    top = 'start: call ("\\n" call)*' if parallel and fmt.parallel else "start: call"
    return f"{top}\ncall: {calls}\n" + "".join(rules)


_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*')


class ToolCallParser:
    """Calls out of generated text, fed piece by piece. `feed`/`finish` return events: ("content", text),
    ("call", index, ToolCall with empty arguments) when a call's name is known, ("arguments", index, text) as its
    arguments are written. With `max_calls`, later calls are dropped."""

    def __init__(self, fmt: ToolFormat, max_calls: Optional[int] = None):
        self.fmt, self.max_calls = fmt, max_calls
        self.pending = ""  # text not yet given out
        self.inside = False  # within a call block
        self.calls: List[ToolCall] = []
        self._named = False  # the current block's name was given out
        self._args = 0  # characters of the current block's arguments given out
        self._depth, self._string, self._escape, self._done = 0, False, False, False
        self._body = ""  # the current block's text
        self._after = False  # right after a call

    def _content(self, text: str) -> list:
        if self.calls and self._after:  # the blank between calls (or after the last) is no content
            text = text.lstrip()
            self._after = not text
        return [("content", text)] if text else []

    def feed(self, text: str) -> list:
        self.pending += text
        events = []
        while True:
            marker = self.fmt.end if self.inside else self.fmt.start
            at = self.pending.find(marker)
            if at < 0:  # all but what may be the start of the marker
                keep = next((k for k in range(min(len(marker) - 1, len(self.pending)), 0, -1)
                             if marker.startswith(self.pending[-k:])), 0)
                text, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
                return events + (self._block(text, closed=False) if self.inside else self._content(text))
            text, self.pending = self.pending[:at], self.pending[at + len(marker):]
            if self.inside:
                events += self._block(text, closed=True)
            else:
                events += self._content(text)
                self.inside, self._body = True, ""
                self._named, self._args, self._depth, self._string, self._escape, self._done = (
                    False, 0, 0, False, False, False)

    def finish(self) -> list:
        events = self._block(self.pending, closed=True, marked=False) if self.inside else self._content(self.pending)
        self.pending = ""
        return events

    def _dropped(self) -> bool:
        return self.max_calls is not None and len(self.calls) >= self.max_calls and not self._named

    def _block(self, chunk: str, closed: bool, marked: bool = True) -> list:
        self._body += chunk
        events = []
        if not self._named and not self._dropped():
            m = _HEADER.match(self._body)
            if m:
                self.calls.append(ToolCall(json.loads(m.group(1)), ""))
                self._named, self._start = True, m.end()
                events.append(("call", len(self.calls) - 1, self.calls[-1]))
        if self._named:
            events += self._arguments()
        if closed:
            self.inside, self._after = False, True
            if not self._named and not self._dropped():
                events += self._fallback(self.fmt.end if marked else "")
            self._named = False
        return events

    def _arguments(self) -> list:
        """The arguments written since last time, up to the end of the arguments value."""
        text, i = self._body[self._start:], self._args
        while i == 0 and text[:1].isspace():  # the blank between the key and the value
            self._start += 1
            text = text[1:]
        while i < len(text) and not self._done:
            c = text[i]
            if self._string:
                self._escape, self._string = (False, True) if self._escape else (c == "\\", c != '"')
            elif c == '"':
                self._string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                self._done = self._depth <= 0
            elif self._depth == 0 and not c.isspace():  # a bare value (not an object): up to the next delimiter
                self._done = c in ",}"
                if self._done:
                    break
            i += 1
        new, self._args = text[self._args:i], i
        if not new:
            return []
        self.calls[-1].arguments += new
        return [("arguments", len(self.calls) - 1, new)]

    def _fallback(self, end: str) -> list:
        """A closed block whose name did not come first: a call if mlx-lm's parser reads one, else content."""
        try:
            value = json_tools.parse_tool_call(self._body)
            name, args = value["name"], value.get(self.fmt.args_key, value.get("arguments", {}))
            if not isinstance(name, str) or not isinstance(args, dict):
                raise ValueError
        except (ValueError, TypeError, KeyError, AttributeError):
            return self._content(self.fmt.start + self._body + end)
        self.calls.append(ToolCall(name, dumps(args)))
        return [("call", len(self.calls) - 1, ToolCall(name, "", self.calls[-1].id)),
                ("arguments", len(self.calls) - 1, self.calls[-1].arguments)]


def parse_tool_calls(fmt: ToolFormat, text: str, max_calls: Optional[int] = None) -> Tuple[str, List[ToolCall]]:
    """(the content, the calls) of a whole reply."""
    parser = ToolCallParser(fmt, max_calls)
    events = parser.feed(text) + parser.finish()
    return "".join(e[1] for e in events if e[0] == "content").strip(), parser.calls

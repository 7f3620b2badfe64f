"""InternVL3.5's thinking mode: the switch, the reasoning/answer split, and the thinking budget.

- **On** is the model card's recipe: its thinking system prompt (`R1_SYSTEM_PROMPT`, which replaces the default
  system message, as `model.system_message = R1_SYSTEM_PROMPT` does before `model.chat(...)`) and its sampling
  (`do_sample=True, temperature=0.6`: `THINKING_TEMPERATURE`, used when no temperature is given). The model then
  opens `<think>` itself.
- **Off** starts the reply with an empty think block, the authors' advice for turning thinking off and what the
  Qwen3 backbone's own chat template writes for `enable_thinking=False`: `<think>\\n\\n</think>\\n\\n` after the
  assistant role.
- **None** (the default) changes nothing: the checkpoint's own system message, no think block.

The renderer (`render.Renderer`) applies the switch, so every caller (generate, chat, batch, the server) gets the
same prompt. `ReasoningParser` splits streamed text into reasoning (inside `<think>...</think>`) and answer;
`HarmonyParser` does the same for GPT-OSS's harmony channels (analysis: reasoning, final: answer).
`ThinkingBudget` is a logits processor that, after N thinking tokens, forces `</think>` and the blank line the
template puts after it, so the answer follows.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

import mlx.core as mx

from .errors import UserError

R1_SYSTEM_PROMPT = """
You are an AI assistant that rigorously follows this response protocol:

1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and reason \
through the problem step-by-step. Enclose this entire thinking process within <think> and </think> tags.

2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate the \
answer from the think section with a newline.

Ensure that the thinking process is thorough but remains focused on the query. The final answer should be \
standalone and not reference the thinking section.
""".strip()

THINKING_TEMPERATURE = 0.6  # the model card: "do_sample=True and temperature=0.6 to mitigate undesired repetition"
THINK_START, THINK_END = "<think>", "</think>"
EMPTY_THINK = "<think>\n\n</think>\n\n"  # Qwen3's chat template with enable_thinking=False
AFTER_THINK = "\n\n"  # what the template writes after </think>, forced with it when the budget runs out


def system_for(thinking: Optional[bool], system: Optional[str]) -> Optional[str]:
    """The system message of a request: thinking on replaces the default (None) with the card's prompt; a system
    message given explicitly is kept."""
    return R1_SYSTEM_PROMPT if thinking and system is None else system


def generation_suffix(thinking: Optional[bool]) -> str:
    """What follows the assistant role of the turn being generated."""
    return EMPTY_THINK if thinking is False else ""


def temperature_for(thinking: Optional[bool], temperature: Optional[float]) -> Optional[float]:
    """The temperature to use: the given one, else the card's 0.6 when thinking is on, else None (the default)."""
    if temperature is None and thinking:
        return THINKING_TEMPERATURE
    return temperature


def check_budget(budget) -> Optional[int]:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise UserError(f"thinking_budget must be an integer >= 0 (tokens of reasoning before </think> is forced), "
                        f"got {budget!r}")
    return budget


class _Channel:
    """One output channel, stripped as a whole while streamed: leading whitespace dropped, trailing held back."""

    def __init__(self):
        self.started, self.held = False, ""

    def add(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        out = self.held + body if body else ""
        self.held = (self.held if not body else "") + text[len(body):]
        return out


class ReasoningParser:
    """Splits a reply streamed as text pieces into (reasoning, answer) pieces, each channel stripped as upstream
    strips replies. Text inside `<think>...</think>` is reasoning; a tag split across pieces is recognised (the
    possible start of a tag is held back). `in_think=True` when the prompt already opened the block."""

    def __init__(self, in_think: bool = False):
        self.in_think = in_think
        self._buf = ""
        self._reasoning, self._answer = _Channel(), _Channel()

    def _route(self, text: str, out: List[str]) -> None:
        out[0 if self.in_think else 1] += (self._reasoning if self.in_think else self._answer).add(text)

    def feed(self, text: str) -> Tuple[str, str]:
        """The (reasoning, answer) text that `text` completes."""
        out = ["", ""]
        self._buf += text
        while True:
            tag = THINK_END if self.in_think else THINK_START
            i = self._buf.find(tag)
            if i < 0:
                break
            self._route(self._buf[:i], out)
            self._buf = self._buf[i + len(tag):]
            self.in_think = not self.in_think
        keep = next((k for k in range(min(len(tag) - 1, len(self._buf)), 0, -1) if tag.startswith(self._buf[-k:])), 0)
        self._route(self._buf[:len(self._buf) - keep], out)
        self._buf = self._buf[len(self._buf) - keep:]
        return out[0], out[1]

    def finish(self) -> Tuple[str, str]:
        """What is left at the end (a held-back partial tag is text after all)."""
        out = ["", ""]
        self._route(self._buf, out)
        self._buf = ""
        return out[0], out[1]


# OpenAI's harmony markers (GPT-OSS): a message is `<|channel|>{name}<|message|>{body}`, ended by one of `_ENDS`;
# between messages the model writes `<|start|>assistant`.
CHANNEL, MESSAGE = "<|channel|>", "<|message|>"
_ENDS = ("<|end|>", "<|return|>", "<|call|>", "<|start|>")


class HarmonyParser:
    """`ReasoningParser`'s counterpart for GPT-OSS replies (decoded with their special tokens): the body of the
    `analysis` channel is reasoning, the body of any other channel (`final`, `commentary`) or of a message without
    a channel is the answer, the headers and markers are neither. A marker split across pieces is held back."""

    def __init__(self):
        self._buf, self._header, self._channel = "", True, None
        self._reasoning, self._answer = _Channel(), _Channel()
        self._marked = False  # whether any harmony marker was seen (a reply without any is all answer)

    def _route(self, text: str, out: List[str]) -> None:
        if self._channel == "analysis":
            out[0] += self._reasoning.add(text)
        else:
            out[1] += self._answer.add(text)

    def _step(self, out: List[str]) -> bool:
        """Consume one header or one message body from the buffer; False when more text is needed."""
        if self._header:
            i = self._buf.find(MESSAGE)
            if i < 0:
                return False
            head = self._buf[:i]
            self._channel = head.split(CHANNEL, 1)[1].strip() if CHANNEL in head else None
            self._buf, self._header, self._marked = self._buf[i + len(MESSAGE):], False, True
            return True
        hits = [(j, e) for e in _ENDS if (j := self._buf.find(e)) >= 0]
        if not hits:
            return False
        j, end = min(hits)
        self._route(self._buf[:j], out)
        self._buf, self._header, self._marked = self._buf[j + len(end):], True, True
        return True

    def feed(self, text: str) -> Tuple[str, str]:
        """The (reasoning, answer) text that `text` completes."""
        out = ["", ""]
        self._buf += text
        while self._step(out):
            pass
        if not self._header:  # a body: pass on what cannot be the start of an end marker
            keep = next((k for k in range(min(9, len(self._buf)), 0, -1)
                         if any(e.startswith(self._buf[-k:]) for e in _ENDS)), 0)
            self._route(self._buf[:len(self._buf) - keep], out)
            self._buf = self._buf[len(self._buf) - keep:]
        return out[0], out[1]

    def finish(self) -> Tuple[str, str]:
        """What is left at the end: an unfinished body is still its channel's; text that never used harmony
        markers at all is the answer."""
        out = ["", ""]
        if not self._header or not self._marked:
            self._route(self._buf, out)
        self._buf = ""
        return out[0], out[1]


def with_reasoning_level(system: str, level: str) -> str:
    """A GPT-OSS system message with its `Reasoning: ...` line set to `level` (low, medium or high), the way
    harmony names the reasoning effort."""
    new, n = re.subn(r"^Reasoning: \w+$", f"Reasoning: {level}", system, flags=re.M)
    if not n:
        raise UserError("the system message has no 'Reasoning: low|medium|high' line to set the reasoning level in; "
                        "write the level in the system message yourself")
    return new


def reply_parser(template=None):
    """The parser that splits a reply made with `template` into reasoning and answer."""
    return HarmonyParser() if template is not None and template.decode_special else ReasoningParser()


def reasoning_block(reasoning: str, template=None) -> str:
    """`reasoning` as the model wrote it, markers included (for counting its tokens): a GPT-OSS analysis message,
    or InternVL3.5's think block."""
    if template is not None and template.decode_special:
        return f"{CHANNEL}analysis{MESSAGE}{reasoning}{_ENDS[0]}"
    return f"<think>{reasoning}</think>"


def split_reasoning(text: str, in_think: bool = False, template=None) -> Tuple[str, str]:
    """(reasoning, answer) of a whole reply."""
    parser = ReasoningParser(in_think) if template is None else reply_parser(template)
    a, b = parser.feed(text)
    c, d = parser.finish()
    return a + c, b + d


def think_token_ids(tokenizer) -> Tuple[int, int, List[int]]:
    """(`<think>` id, `</think>` id, ids forced when the budget runs out: `</think>` and the blank line after it);
    a clear error when the tokenizer has no single token for the tags. mlx-lm's `TokenizerWrapper` already knows
    its think tokens; a plain Hugging Face tokenizer is asked by encoding the tags."""
    problem = f"thinking_budget needs a tokenizer with one token each for {THINK_START} and {THINK_END} " \
              "(the Qwen3 tokenizer of InternVL3.5 has them); this one has not"
    if hasattr(tokenizer, "has_thinking"):
        if not tokenizer.has_thinking or tokenizer.think_start != THINK_START:
            raise UserError(problem)
        ids = [tokenizer.think_start_id, tokenizer.think_end_id]
    else:
        encoded = [tokenizer.encode(tag, add_special_tokens=False) for tag in (THINK_START, THINK_END)]
        if any(len(e) != 1 for e in encoded):
            raise UserError(problem)
        ids = [e[0] for e in encoded]
    forced = ids[1:] + list(tokenizer.encode(AFTER_THINK, add_special_tokens=False))
    return ids[0], ids[1], forced


class ThinkingBudget:
    """A logits processor (mlx-lm's `processor(tokens, logits) -> logits`, one per sequence) that lets at most
    `budget` tokens follow `<think>` before it forces `</think>` and the blank line after it.

    The first call sees the whole context (the prompt may have opened the block); later calls look at the last token
    only. One instance per sequence: it keeps that sequence's state."""

    def __init__(self, budget: int, start_id: int, end_id: int, forced: List[int]):
        self.budget, self.start_id, self.end_id, self.forced = budget, start_id, end_id, forced
        self.count: Optional[int] = None  # thinking tokens so far; None: not inside a think block
        self.pending: List[int] = []  # forced tokens still to emit
        self._seen = False

    @classmethod
    def for_tokenizer(cls, budget: int, tokenizer) -> ThinkingBudget:
        return cls(check_budget(budget), *think_token_ids(tokenizer))

    def _observe(self, token: int) -> None:
        if self.pending and token == self.pending[0]:
            self.pending.pop(0)
        elif token == self.start_id:
            self.count = 0
        elif token == self.end_id:
            self.count = None
        elif self.count is not None:
            self.count += 1

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if not self._seen:
            self._seen = True
            ids = tokens.tolist() if tokens.size else []
            starts = [i for i, t in enumerate(ids) if t == self.start_id]
            if starts and self.end_id not in ids[starts[-1]:]:
                self.count = len(ids) - starts[-1] - 1
        elif tokens.size:
            self._observe(int(tokens[-1].item()))
        if not self.pending and self.count is not None and self.count >= self.budget:
            self.pending, self.count = list(self.forced), None
        if not self.pending:
            return logits
        mask = mx.arange(logits.shape[-1]) == self.pending[0]
        return mx.where(mask, mx.zeros_like(logits), mx.full(logits.shape, -mx.inf, dtype=logits.dtype))


def thinking_options(thinking: Optional[bool], sampling, options: dict) -> dict:
    """`options` (keyword sampling fields) with the card's temperature added when thinking is on and neither
    `sampling` nor `options` chose one."""
    if thinking and sampling is None and "temperature" not in options:
        return dict(options, temperature=THINKING_TEMPERATURE)
    return options


def budget_processors(budget: Optional[int], tokenizer, draft=None) -> list:
    """The logits processors a thinking budget adds for one sequence (none without a budget)."""
    if check_budget(budget) is None:
        return []
    if draft is not None:
        raise UserError("thinking_budget cannot be combined with speculative decoding (a draft model); drop one")
    return [ThinkingBudget.for_tokenizer(budget, tokenizer)]

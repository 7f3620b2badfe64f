"""One renderer: a conversation -> prompt text, token ids, image-token spans and a per-token loss mask.

Generation (`Processor`), `ChatSession`, LoRA training and the server all render through `Renderer.render`, so the
prompt a model is trained on is token for token the prompt it is later asked with.

- A conversation is an optional system message and `(role, text)` messages (`USER` / `ASSISTANT`); user texts hold
  one `<image>` placeholder per image (where upstream puts them: `processing.add_image_placeholders`). A last
  `(ASSISTANT, None)` asks for the generation prompt, the bare assistant role (with thinking off, followed by the
  empty think block; with thinking on, the system message is the model card's thinking prompt: `thinking.py`).
- The text is the checkpoint template's (`Template.render_spans`); each `<image>`, first to last, becomes
  `<img>` + `<IMG_CONTEXT>` * (tiles x tokens per tile) + `</img>`; the whole text is tokenized in one piece with
  the tokenizer's own BOS rule.
- The loss mask covers each assistant message and the stop token that ends it (`<|im_end|>`, `<|end|>`), not the
  role header and not the newline internvl2_5 puts after the stop token: the tokens upstream's
  `preprocess_internvl2_5` / `preprocess_mpt` / `preprocess_phi3` learn. Span boundaries are found by tokenizing
  the text up to each boundary and taking the common prefix with the full ids, which works for BPE and
  sentencepiece alike (a token straddling the start of an answer counts as answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .errors import UserError
from .templates import ASSISTANT, USER, Message, Template
from .thinking import generation_suffix, system_for
from .tokenizer import IMG_CONTEXT, IMG_END, IMG_START


@dataclass
class Rendered:
    """A rendered conversation. `image_spans[k]` is the `[start, end)` token range of image k's `<IMG_CONTEXT>`
    run; `loss_mask[t]` (when asked for) is True where token `ids[t]` is learned (predicted from `ids[:t]`)."""

    text: str
    ids: List[int]
    image_spans: List[Tuple[int, int]]
    loss_mask: Optional[np.ndarray] = None


def _common_prefix(a: np.ndarray, b: List[int]) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != np.asarray(b[:n], dtype=a.dtype))[0]
    return int(diff[0]) if len(diff) else n


class Renderer:
    """Renders conversations for one tokenizer and template; `system_message` is the checkpoint's default (None:
    the template's own)."""

    def __init__(self, tokenizer, template: Template, tokens_per_tile: int, image_token_id: int,
                 system_message: Optional[str] = None):
        self.tokenizer = tokenizer
        self.template = template
        self.tokens_per_tile = tokens_per_tile
        self.image_token_id = image_token_id
        self.system_message = system_message

    def _expand(self, text: str, tiles: Iterator[int]) -> str:
        while "<image>" in text:
            text = text.replace("<image>", IMG_START + IMG_CONTEXT * (self.tokens_per_tile * next(tiles)) + IMG_END, 1)
        return text

    def text(self, messages: Sequence[Message], num_tiles: Sequence[int] = (), system: Optional[str] = None,
             thinking: Optional[bool] = None, tools=None) -> Tuple[str, List[Tuple[int, int]]]:
        """(the prompt text with images expanded, the character span of each assistant answer + its stop token).
        `num_tiles[k]` is the tile count of the k-th `<image>` in the user messages. `thinking` (see `thinking.py`):
        True puts the model card's thinking system prompt in place of the default, False starts the generated
        turn with an empty think block, None does neither. `tools`: (a `tools.ToolFormat`, its `Tool`s) shown to
        the model, written into the system message (or the turns after it) as that format writes them."""
        if thinking is not None and self.template.decode_special:
            raise UserError(f"thinking on/off is InternVL3.5's <think> switch; the {self.template.name} template "
                            "(GPT-OSS) reasons in its analysis channel, at the level its system message names "
                            "('Reasoning: low|medium|high'): drop the thinking switch and set that in the system "
                            "message instead")
        count = sum(text.count("<image>") for role, text in messages if role == USER and text)
        if count != len(num_tiles):
            raise UserError(f"the conversation has {count} <image> placeholder(s) but {len(num_tiles)} "
                            "image(s)/frame(s) were given; use one <image> per image, or none to have them added")
        tiles = iter(num_tiles)
        expanded = [(role, self._expand(text, tiles) if role == USER and text else text) for role, text in messages]
        system = system_for(thinking, system)
        system = self.system_message if system is None else system
        if tools:
            system, prefix = tools[0].system(self.template.system_message if system is None else system, tools[1])
            expanded = prefix + expanded
        text, spans = self.template.render_spans(system, expanded)
        if messages and messages[-1] == (ASSISTANT, None):
            text += generation_suffix(thinking)
        return text, spans

    def render(self, messages: Sequence[Message], num_tiles: Sequence[int] = (), system: Optional[str] = None,
               loss_mask: bool = False, thinking: Optional[bool] = None, tools=None) -> Rendered:
        """Text, ids and image spans of the conversation; with `loss_mask`, also the mask of answer tokens."""
        text, answers = self.text(messages, num_tiles, system, thinking, tools)
        ids = list(self.tokenizer.encode(text))
        spans = self.image_spans(ids)
        found, expected = sum(b - a for a, b in spans), sum(num_tiles) * self.tokens_per_tile
        if found != expected:
            raise UserError(f"the prompt tokenized to {found} image tokens, expected {expected}; does the "
                            f"tokenizer split {IMG_CONTEXT}?")
        mask = self._loss_mask(text, np.asarray(ids, dtype=np.int32), answers) if loss_mask else None
        return Rendered(text, ids, spans, mask)

    def image_spans(self, ids: Sequence[int]) -> List[Tuple[int, int]]:
        """`[start, end)` of every run of `<IMG_CONTEXT>` tokens (one run per image: `<img>`/`</img>` separate them)."""
        is_image = np.concatenate([[False], np.asarray(ids) == self.image_token_id, [False]])
        edges = np.nonzero(np.diff(is_image.astype(np.int8)))[0]
        return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]

    def _loss_mask(self, text: str, ids: np.ndarray, answers: List[Tuple[int, int]]) -> np.ndarray:
        mask = np.zeros(len(ids), dtype=bool)
        for start, end in answers:
            a = _common_prefix(ids, self.tokenizer.encode(text[:start]))
            b = _common_prefix(ids, self.tokenizer.encode(text[:end]))
            mask[a:b] = True
        return mask

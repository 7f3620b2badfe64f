"""Preference pairs: four file formats -> (prompt, chosen, rejected), rendered and batched as SFT samples are.

Accepted lines (one pair each):
- InternVL's MMPR: `{"image": "a.jpg" | [...], "question", "chosen", "rejected"}`;
- TRL's: `{"prompt", "chosen", "rejected", "images"?}`, plain strings or conversational (`prompt` a list of
  messages, `chosen`/`rejected` one-assistant-message lists; `{"type": "image"}` parts take `images` in order);
- ms-swift's: `{"messages": [..., chosen assistant turn], "rejected_response", "images"?}`;
- OpenAI style: `{"messages": [..., chosen assistant turn], "rejected": "text" | {"role": "assistant", ...}}`.

Each side becomes a conversation that goes through the SFT reader's checks (`data.parse_record`) and the SFT
renderer (`render.encode_sample`): the prompt tokens of both sides are the ones generation feeds, and the loss
mask covers the final answer only (earlier assistant turns of a multi-turn prompt are context). A bad line is
reported as `file:line: why` with the others, before training.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional

import numpy as np

from .batching import Batcher, collate, encode_dataset
from .data import BadLine, Dataset, Sample, parse_record
from .render import Encoded, encode_sample


@dataclass
class PairSample:
    chosen: Sample
    rejected: Sample
    where: str = "?"
    max_tiles: Optional[int] = None


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    where: str

    @property
    def ids(self) -> np.ndarray:  # the longer side, which sets the padded length
        return max(self.chosen.ids, self.rejected.ids, key=len)

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


def _answer(value, key: str):
    """A chosen/rejected answer: a string, an assistant message, or a one-message list (TRL conversational)."""
    if isinstance(value, list):
        if len(value) != 1:
            raise BadLine(f"'{key}' must hold exactly one assistant message, got {len(value)}")
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant" or "content" not in value:
            raise BadLine(f"'{key}' must be an assistant message with 'content'")
        return value["content"]
    if not isinstance(value, str):
        raise BadLine(f"'{key}' must be a string or an assistant message, got {type(value).__name__}")
    return value


def _bare_images_to_placeholders(messages: list) -> list:
    """TRL's `{"type": "image"}` parts (the image itself in `images`) -> `<image>` text parts."""
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = [{"type": "text", "text": "<image>\n"} if isinstance(p, dict) and p.get("type") == "image"
                     and not any(k in p for k in ("image", "url", "path")) else p for p in m["content"]]
            m = dict(m, content=parts)
        out.append(m)
    return out


def _sides(obj: dict):
    """(OpenAI-style messages with the chosen answer, the same with the rejected one, images)."""
    if "question" in obj:  # MMPR
        prompt = [{"role": "user", "content": obj["question"]}]
        return prompt, _answer(obj["chosen"], "chosen"), _answer(obj["rejected"], "rejected"), obj.get("image")
    if "prompt" in obj:  # TRL
        prompt = obj["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not isinstance(prompt, list):
            raise BadLine("'prompt' must be a string or a list of messages")
        return prompt, _answer(obj["chosen"], "chosen"), _answer(obj["rejected"], "rejected"), obj.get("images")
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
        raise BadLine("'messages' must end with the chosen assistant turn")
    key = "rejected_response" if "rejected_response" in obj else "rejected"
    return msgs[:-1], _answer(msgs[-1], "messages[-1]"), _answer(obj[key], key), obj.get("images")


def parse_pair(obj, root) -> PairSample:
    """One decoded json line -> PairSample (raises BadLine)."""
    if not isinstance(obj, dict):
        raise BadLine(f"expected a JSON object, got {type(obj).__name__}")
    if not ({"question", "prompt"} & obj.keys() or ("messages" in obj and obj.keys() & {"rejected",
                                                                                      "rejected_response"})):
        raise BadLine("not a preference pair: expected 'question' + 'chosen' + 'rejected' (MMPR), 'prompt' + "
                      "'chosen' + 'rejected' (TRL), 'messages' + 'rejected_response' (ms-swift) or 'messages' + "
                      f"'rejected' (OpenAI style); keys are {sorted(obj)}")
    try:
        prompt, chosen, rejected, images = _sides(obj)
    except KeyError as e:
        raise BadLine(f"missing key {e}") from None
    prompt = _bare_images_to_placeholders(prompt)
    sides = []
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        record = {"messages": prompt + [{"role": "assistant", "content": answer}]}
        if images not in (None, "", []):
            record["images"] = images
        try:
            sides.append(parse_record(record, root))
        except BadLine as e:
            raise BadLine(f"{name} side: {e}") from None
        if not answer.strip():
            raise BadLine(f"the {name} answer is empty")
    if chosen == rejected:
        raise BadLine("the chosen and rejected answers are the same text")
    return PairSample(*sides)


def _final_answer_only(enc: Encoded) -> Encoded:
    """Keep the loss mask on the last answer only (its last contiguous run of masked tokens)."""
    mask = enc.mask.copy()
    idx = np.flatnonzero(mask)
    gaps = np.flatnonzero(np.diff(idx) > 1)
    if len(gaps):
        mask[: idx[gaps[-1] + 1]] = False
    return replace(enc, mask=mask)


def encode_pair(pair: PairSample, processor, max_tiles=None, max_length=None) -> EncodedPair:
    sides = []
    for s in (pair.chosen, pair.rejected):
        s.where, s.max_tiles = pair.where, pair.max_tiles
        sides.append(_final_answer_only(encode_sample(s, processor, max_tiles, max_length)))
    return EncodedPair(*sides, pair.where)


def encode_pairs(data: Dataset, processor, args):
    """(encoded pairs, problems, number truncated), as `batching.encode_dataset` gives them for SFT samples."""
    return encode_dataset(data, processor, args, encode=encode_pair)


class PairBatcher(Batcher):
    """Microbatches of pairs: rows are the chosen sides, then the rejected ones; one pair counts as one unit."""

    def loss_tokens(self, k: int) -> int:
        return len(self.indices(k))

    def batch(self, k: int):
        return self.rows(self.indices(k))

    def rows(self, indices: List[int]):
        """The microbatch of the pairs `indices` (as `batch(k)` makes it for the k-th microbatch)."""
        pairs: List[EncodedPair] = [self.samples[i] for i in indices]
        rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        return collate(rows, self.config, self.pad_id, self.image_token_id)

"""Reading fine-tuning data in the three formats people already have, into one `Sample` shape.

- InternVL's own jsonl: `{"image": "a.jpg" | [...], "conversations": [{"from": "human"|"gpt"|"system", "value"}]}`,
  and its meta json `{"name": {"root", "annotation", "repeat_time", "max_dynamic_patch"?}, ...}` (a `repeat_time`
  below 1 keeps that leading fraction of the lines, above 1 repeats the list, as upstream's finetune script does);
- ms-swift's `{"query", "response", "history": [[q, a], ...], "images", "system"}`;
- OpenAI-style `{"messages": [{"role", "content": str | [{"type": "text"|"image"|"image_url", ...}]}]}` (image
  parts become `<image>` where they stand; a top-level `"images"` list is accepted too, as ms-swift writes it).

Every bad line is collected as `file:line: why`, so one pass shows all of them. Image paths are resolved against
`root` (os.path.join, also for lists; upstream concatenates strings for lists) and checked to exist. Images are
decoded once, in full, when the samples are encoded (to count tiles and to catch truncated or corrupt files up
front); their pixels are loaded again only when a batch needs them.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from ..errors import UserError
from ..images import open_image
from ..templates import ASSISTANT, ROLES, USER


@dataclass
class Sample:
    """One conversation: `messages` are (USER|ASSISTANT, text with `<image>` placeholders), alternating from a user
    turn and ending with an assistant turn; `images` are resolved paths, URLs or `data:` URLs, in order."""

    messages: List[Tuple[int, str]]
    images: List[str] = field(default_factory=list)
    system: Optional[str] = None
    where: str = "?"
    max_tiles: Optional[int] = None


class BadLine(Exception):
    """A line that cannot be used; the message says why."""


@dataclass
class Dataset:
    samples: List[Sample]
    problems: List[str]  # "file:line: why", one per bad line
    sources: List[str]

    def __len__(self) -> int:
        return len(self.samples)


def _is_remote(ref: str) -> bool:
    return ref.startswith(("http://", "https://", "data:"))


def _resolve_image(ref, root: Optional[Path]) -> str:
    if not isinstance(ref, str) or not ref:
        raise BadLine(f"image reference {ref!r} is not a non-empty string")
    if _is_remote(ref):
        return ref
    path = Path(os.path.join(str(root), ref)) if root is not None and not os.path.isabs(ref) else Path(ref)
    if not path.is_file():
        hint = "" if root is not None else " (relative paths are resolved against --root, which is not set)"
        raise BadLine(f"image not found: {path}{hint}")
    return str(path)


def _images_field(value, key: str) -> List:
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise BadLine(f"'{key}' must be a string or a list of strings, got {type(value).__name__}")


def _check_turns(messages: List[Tuple[int, str]]) -> None:
    if not messages:
        raise BadLine("the conversation has no messages")
    for i, (role, text) in enumerate(messages):
        if role != i % 2:
            want = "user/human" if i % 2 == 0 else "assistant/gpt"
            raise BadLine(f"message {i + 1} should be from {want}: turns must alternate, starting with the user")
        if not isinstance(text, str):
            raise BadLine(f"message {i + 1} has a {type(text).__name__} value, expected a string")
        if role == ASSISTANT and "<image>" in text:
            raise BadLine(f"message {i + 1} (assistant) contains <image>; images belong in user turns")
    if messages[-1][0] != ASSISTANT:
        raise BadLine("the conversation ends with a user turn, which has no answer to learn from")
    if not any(text.strip() for role, text in messages if role == ASSISTANT):
        raise BadLine("every assistant answer is empty")


def parse_internvl(obj: dict, root: Optional[Path]) -> Sample:
    if obj.get("video"):
        raise BadLine("video samples are not supported by mlx-internvl lora (sample frames into an image list)")
    conv = obj["conversations"]
    if not isinstance(conv, list):
        raise BadLine("'conversations' must be a list")
    system, messages = None, []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadLine(f"conversations[{i}] must be an object with 'from' and 'value'")
        who = turn["from"]
        if who == "system":
            if i != 0:
                raise BadLine(f"conversations[{i}] is a system turn; only the first turn may be one")
            system = turn["value"]
            continue
        if who not in ("human", "gpt"):
            raise BadLine(f"conversations[{i}].from is {who!r}; expected 'human', 'gpt' or (first) 'system'")
        messages.append((ROLES[who], turn["value"]))
    images = [_resolve_image(r, root) for r in _images_field(obj.get("image"), "image")]
    return Sample(messages, images, system)


def parse_swift(obj: dict, root: Optional[Path]) -> Sample:
    messages = []
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise BadLine("'history' must be a list of [query, response] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise BadLine(f"history[{i}] must be a [query, response] pair")
        messages += [(USER, pair[0]), (ASSISTANT, pair[1])]
    messages += [(USER, obj["query"]), (ASSISTANT, obj["response"])]
    images = [_resolve_image(r, root) for r in _images_field(obj.get("images"), "images")]
    return Sample(messages, images, obj.get("system"))


def _image_part_ref(part: dict, i: int, j: int):
    kind = part.get("type")
    if kind == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    for key in ("image", "url", "path"):
        if isinstance(part.get(key), str):
            return part[key]
    raise BadLine(f"messages[{i}].content[{j}] is an image part without 'image', 'url' or 'path'")


def parse_openai(obj: dict, root: Optional[Path]) -> Sample:
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        raise BadLine("'messages' must be a list")
    system, messages, refs = None, [], []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadLine(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if isinstance(content, list):
            text = ""
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    raise BadLine(f"messages[{i}].content[{j}] must be an object")
                if part.get("type") == "text":
                    if not isinstance(part.get("text", ""), str):
                        raise BadLine(f"messages[{i}].content[{j}].text must be a string")
                    text += part.get("text", "")
                elif part.get("type") in ("image", "image_url"):
                    refs.append(_image_part_ref(part, i, j))
                    text += "<image>\n"
                else:
                    raise BadLine(f"messages[{i}].content[{j}].type is {part.get('type')!r}; expected text, "
                                  "image or image_url")
            content = text
        elif not isinstance(content, str):
            raise BadLine(f"messages[{i}].content must be a string or a list of parts")
        if role == "system":
            if i != 0:
                raise BadLine(f"messages[{i}] is a system message; only the first message may be one")
            system = content
        elif role in ("user", "assistant"):
            messages.append((ROLES[role], content))
        else:
            raise BadLine(f"messages[{i}].role is {role!r}; expected system, user or assistant")
    extra = _images_field(obj.get("images"), "images")
    if refs and extra:
        raise BadLine("images are given both as message parts and in 'images'; use one of the two")
    images = [_resolve_image(r, root) for r in refs + extra]
    return Sample(messages, images, system)


def parse_record(obj, root: Optional[Path]) -> Sample:
    """One decoded json line -> Sample (raises BadLine)."""
    if not isinstance(obj, dict):
        raise BadLine(f"expected a JSON object, got {type(obj).__name__}")
    try:
        if "conversations" in obj:
            sample = parse_internvl(obj, root)
        elif "messages" in obj:
            sample = parse_openai(obj, root)
        elif "query" in obj and "response" in obj:
            sample = parse_swift(obj, root)
        else:
            raise BadLine("unknown format: expected 'conversations' (InternVL), 'messages' (OpenAI style) or "
                          f"'query' + 'response' (ms-swift); keys are {sorted(obj)}")
    except KeyError as e:
        raise BadLine(f"missing key {e}") from None
    _check_turns(sample.messages)
    n_placeholders = sum(text.count("<image>") for _, text in sample.messages)
    if n_placeholders and n_placeholders != len(sample.images):
        raise BadLine(f"{n_placeholders} <image> placeholder(s) for {len(sample.images)} image(s); use one per "
                      "image, or none to have them put before the first question")
    if sample.system is not None and not isinstance(sample.system, str):
        raise BadLine("the system message must be a string")
    return sample


def read_jsonl(path: Path, root: Optional[Path], repeat_time: float = 1.0, max_tiles: Optional[int] = None,
               display: Optional[str] = None, parse=parse_record) -> Tuple[List[Sample], List[str]]:
    """Samples and problems ('file:line: why') of one jsonl file; `parse(obj, root)` reads one line."""
    name = display or str(path)
    samples, problems = [], []
    try:
        # JSON Lines are separated by \n only (str.splitlines would also split on \r, \x0b, \u2028, ... and then
        # the line numbers in messages would not be the ones an editor shows).
        with open(path, encoding="utf-8", newline="") as f:  # no newline translation either
            lines = f.read().split("\n")
    except OSError as e:
        raise UserError(f"{path}: cannot read the data file ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from e
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if repeat_time < 1:
        numbered = numbered[: int(len(numbered) * repeat_time)]
    for lineno, line in numbered:
        where = f"{name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        except RecursionError:
            problems.append(f"{where}: JSON nested too deeply to read (thousands of levels); is the line garbled?")
            continue
        try:
            sample = parse(obj, root)
        except (BadLine, UserError) as e:
            problems.append(f"{where}: {e}")
            continue
        except RecursionError:
            problems.append(f"{where}: nested too deeply to read")
            continue
        sample.where, sample.max_tiles = where, max_tiles
        samples.append(sample)
    if repeat_time > 1:
        samples = samples * int(repeat_time)
    return samples, problems


def _meta_path(value, key: str, base: Path, name: str) -> Path:
    if not isinstance(value, str) or not value:
        raise UserError(f"{base}: dataset {name!r} needs a '{key}' string")
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base.parent / p)


def read_meta(path: Path, root_override: Optional[Path] = None,
              parse=parse_record) -> Tuple[List[Sample], List[str], List[str]]:
    """InternVL's meta json: relative `annotation`/`root` paths are taken relative to the meta file."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: cannot read the meta json ({e})") from e
    if not isinstance(meta, dict) or not meta:
        raise UserError(f"{path}: a meta file maps dataset names to {{'root', 'annotation', 'repeat_time'}} objects")
    samples, problems, sources = [], [], []
    for name, entry in meta.items():
        if not isinstance(entry, dict):
            raise UserError(f"{path}: dataset {name!r} must be an object with 'root' and 'annotation'")
        ann = _meta_path(entry.get("annotation"), "annotation", path, name)
        if ann.suffix != ".jsonl":
            raise UserError(f"{path}: dataset {name!r}: annotation {ann} must be a .jsonl file")
        root = root_override or (_meta_path(entry["root"], "root", path, name) if entry.get("root") else None)
        repeat = entry.get("repeat_time", 1)
        if not isinstance(repeat, (int, float)) or repeat <= 0 or (repeat > 1 and repeat != int(repeat)):
            raise UserError(f"{path}: dataset {name!r}: repeat_time must be a fraction in (0, 1] or a whole number, "
                            f"got {repeat!r}")
        max_tiles = entry.get("max_dynamic_patch")
        if max_tiles is not None and (isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 1):
            raise UserError(f"{path}: dataset {name!r}: max_dynamic_patch must be a whole number >= 1, got "
                            f"{max_tiles!r}")
        s, p = read_jsonl(ann, root, repeat, max_tiles, parse=parse)
        samples += s
        problems += p
        sources.append(str(ann))
    return samples, problems, sources


def load_dataset(paths: Union[str, Path, Sequence[Union[str, Path]]],
                 root: Optional[Union[str, Path]] = None, parse=parse_record) -> Dataset:
    """Read jsonl files and/or InternVL meta json files into one Dataset (bad lines listed in `problems`);
    `parse` reads one line (preference pairs: `pairs.parse_pair`)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    root_path = Path(root).expanduser() if root is not None else None
    if root_path is not None and not root_path.is_dir():
        raise UserError(f"--root {root_path}: no such directory")
    samples, problems, sources = [], [], []
    for p in paths:
        p = Path(p).expanduser()
        if not p.is_file():
            raise UserError(f"{p}: no such data file")
        if p.suffix == ".json":
            s, pr, src = read_meta(p, root_path, parse)
            sources += src
        else:
            s, pr = read_jsonl(p, root_path if root_path is not None else p.parent, parse=parse)
            sources.append(str(p))
        samples += s
        problems += pr
    return Dataset(samples, problems, sources)


def open_image_ref(ref: str):
    """A PIL image for a resolved reference (path, URL or `data:` URL)."""
    if ref.startswith("data:"):
        try:
            payload = base64.b64decode(ref.split(",", 1)[1])
        except (IndexError, ValueError) as e:
            raise UserError(f"a data: URL image is not valid base64 ({e})") from e
        return open_image(payload)
    return open_image(ref)


def image_size(ref: str) -> Tuple[int, int]:
    """(width, height) of the image, which is decoded in full once here, so that a truncated or corrupt file, or a
    decompression bomb, is reported with the other bad lines before training starts, not at the step that needs
    it. The pixels are not kept."""
    try:
        im = open_image_ref(ref)
    except UserError as e:
        raise BadLine(str(e)) from e
    return im.size

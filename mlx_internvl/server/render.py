"""OpenAI messages -> the prompt `ChatSession` would build for the same conversation: the server's one adapter to
the library's conversation code.

Everything the prompt depends on goes through what `ChatSession` uses (`add_image_placeholders`,
`add_video_placeholders`, `chat_messages`, the processor's one `Renderer`, `clamp_max_tokens`), in the same
order: each user turn's new images are prefixed `<image>\\n` (the first turn with one image) or
`Image-k: <image>\\n` with k counting every image of the conversation, then its video frames; assistant turns
are the answers of the history. So a client that resends the whole history gets upstream `chat(history=...)`'s prompt.

Besides the ids, a *keyed* copy is made for the prompt cache: each image's `<IMG_CONTEXT>` tokens are replaced by
a negative id derived from the image's content hash, so two conversations share a cached prefix only if their
images are the same bytes, not merely the same size.

A request's cost is counted before it is paid (`budget`): its text length, images and frames before anything is
fetched; its tiles from the image headers and its decoding cost from the video container before any pixel is
decoded; all before the text is tokenized. Tiles are kept as uint8 until the generation thread encodes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

from ..errors import UserError
from ..processing import (
    add_image_placeholders,
    add_video_placeholders,
    frame_to_pixels,
    image_to_pixels,
    normalize_pixels,
    tile_count,
)
from ..templates import ASSISTANT, USER, chat_messages
from ..thinking import with_reasoning_level
from ..tools import dumps
from ..video import frame_indices, load_video_frames, video_header
from .budget import Budget, Limits, text_bytes
from .media import Media, MediaPolicy, decode_image, fetch, image_header
from .protocol import APIError, ChatRequest, TextPart, VideoPart
from .tools import ToolSetup, turn


@dataclass
class ImageSpec:
    """One `<image>` of the prompt (an image or a video frame), in prompt order."""

    key: Tuple  # image-feature cache key: (sha256 of the bytes, max_tiles) or (video sha256, frames, index)
    num_tiles: int
    tiles: Optional[np.ndarray]  # [T, S, S, 3] uint8; None when the image was not decoded here (seen before)
    load: Callable[[], np.ndarray]  # decodes and tiles the image again (when its features are not cached)

    @property
    def pseudo_id(self) -> int:
        return -1 - int(hashlib.sha256(repr(self.key).encode()).hexdigest()[:12], 16)

    def pixel_values(self) -> np.ndarray:
        """The normalized float32 tiles for the vision model (on the generation thread); the compact copy is let go."""
        tiles = self.tiles if self.tiles is not None else self.load()
        self.tiles = None
        return normalize_pixels(tiles)


@dataclass
class Prompt:
    ids: List[int]
    keyed: List[int]  # ids with each image's tokens replaced by its pseudo id (the prompt-cache key)
    images: List[ImageSpec]
    max_tokens: int  # the reply limit; with the Flash router on, the asked one until the engine has routed


@dataclass
class _Part:
    """An image or video part, as counted before it is decoded."""

    url: str
    param: str
    video: bool
    media: Optional[Media] = None
    num_tiles: int = 1  # per frame for a video
    frames: int = 0


class Renderer:
    """Builds `Prompt`s on request threads (no MLX arrays here: those belong to the generation thread). The cost
    of a request is counted (`budget.Budget`) before its media is fetched, again from the image headers and video
    containers before any pixel is decoded, and the text is measured before it is tokenized."""

    def __init__(self, processor, policy: MediaPolicy, max_tiles: Optional[int] = None, num_frames: int = 8,
                 default_max_tokens: int = 1024, known_size: int = 4096, limits: Optional[Limits] = None,
                 routed: bool = False):
        self.processor, self.policy = processor, policy
        self.max_tiles, self.num_frames, self.default_max_tokens = max_tiles, num_frames, default_max_tokens
        self.routed = routed  # the Flash router is on: the engine shortens the prompt (server/flash_route.py)
        self.budget = Budget(limits or Limits(), processor, routed)
        self._known: OrderedDict[Tuple, None] = OrderedDict()  # image keys decoded lately: their features are cached
        self._known_size = known_size
        self._lock = threading.Lock()

    def _measure(self, part: _Part, max_tiles, num_frames: int, video_pixels: int) -> int:
        """Fetch the part's bytes and count its tiles (image header) or decoding cost (video container)."""
        part.media = fetch(part.url, part.param, self.policy)
        if not part.video:
            size = image_header(part.media, part.param, self.policy.max_pixels).size
            part.num_tiles = tile_count(*size, self.processor.config, max_tiles)
            return video_pixels
        with self._video_file(part) as path:
            header = video_header(path)
        decoded = max(frame_indices(header.frames, header.fps, num_frames)) + 1
        part.frames = num_frames
        return self.budget.video(part.param, header.width, header.height, decoded, video_pixels,
                                 self.policy.max_pixels)

    @contextlib.contextmanager
    def _video_file(self, part: _Part):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "video"
            path.write_bytes(part.media.data)
            try:
                yield path
            except UserError as e:
                raise APIError(400, f"{part.param}: {e}".replace(str(path), "the video"), part.param,
                               "invalid_video") from None

    def _image(self, part: _Part, max_tiles) -> ImageSpec:
        media, param, config = part.media, part.param, self.processor.config
        key = (media.digest, max_tiles)

        def load() -> np.ndarray:
            tiles = image_to_pixels(decode_image(media, param, self.policy.max_pixels), config, max_tiles)
            if tiles.shape[0] != part.num_tiles:  # a format whose pixels disagree with its header
                raise APIError(400, f"{param}: the image decodes to another size than its header says", param,
                               "invalid_image")
            return tiles

        with self._lock:
            known = key in self._known
            if known:
                self._known.move_to_end(key)
        if known:
            return ImageSpec(key, part.num_tiles, None, load)
        tiles = load()
        with self._lock:
            self._known[key] = None
            while len(self._known) > self._known_size:
                self._known.popitem(last=False)
        return ImageSpec(key, part.num_tiles, tiles, load)

    def _video(self, part: _Part) -> List[ImageSpec]:
        config = self.processor.config
        with self._video_file(part) as path:
            frames = load_video_frames(path, num_frames=part.frames, each=lambda f: frame_to_pixels(f, config),
                                       max_pixels=self.policy.max_pixels)
        return [ImageSpec((part.media.digest, part.frames, i), 1, t, lambda t=t: t) for i, t in enumerate(frames)]

    def _turns(self, req: ChatRequest, tools: Optional[ToolSetup] = None) -> Tuple[List[str], List[list]]:
        """(system texts, [role, text, [_Part]] turns with consecutive same-role messages merged); nothing fetched."""
        system: List[str] = []
        turns: List[list] = []
        for i, m in enumerate(req.messages):
            where = f"messages.{i}"
            parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else list(m.content or [])
            text = "\n".join(p.text for p in parts if isinstance(p, TextPart))
            if m.role in ("system", "developer"):
                if turns:
                    raise APIError(400, f"{where}: a system message must come before the conversation", where)
                if len(parts) != sum(isinstance(p, TextPart) for p in parts):
                    raise APIError(400, f"{where}: a system message can only hold text", where)
                system.append(text)
                continue
            role, text = turn(tools, m, where, text)
            if not turns and role == ASSISTANT:
                raise APIError(400, f"{where}: the conversation must start with a user message", where)
            media: List[_Part] = []
            for j, p in enumerate(parts):
                param = f"{where}.content.{j}"
                if isinstance(p, TextPart):
                    continue
                if m.role != "user":
                    raise APIError(400, f"{param}: {m.role} messages can only hold text", param)
                if isinstance(p, VideoPart) and any(q.video for q in media):
                    raise APIError(400, f"{param}: one video per message is supported", param)
                video = isinstance(p, VideoPart)
                media.append(_Part((p.video_url if video else p.image_url).url,
                                   param + (".video_url" if video else ".image_url"), video))
            if turns and ASSISTANT not in (role, turns[-1][0]) and (role != turns[-1][0] or isinstance(role, str)):
                raise APIError(400, f"{where}: with this model's tool format a tool result is one turn, right after "
                                    "the assistant message with its call", where)
            if turns and turns[-1][0] == role:
                turns[-1][1] += "\n" + text
                turns[-1][2] += media
            else:
                turns.append([role, text, media])
        if not turns or turns[-1][0] == ASSISTANT:
            raise APIError(400, "messages: the last message must be a user (or tool) message (the turn to answer)",
                           "messages")
        return system, turns

    @staticmethod
    def _conversation(system: List[str], turns: List[list], num_frames: int):
        """(question, history, system text, [_Part] in prompt order, the role of each user turn: USER or a tool
        result's), by the rule of ChatSession._add_media: each user turn's images first, numbered over the whole
        conversation, then its videos' frames."""
        history, question, parts, n, roles = [], None, [], 0, []
        for role, text, media in turns:
            if role == ASSISTANT:
                history.append((question, text.strip()))
                continue
            roles.append(role)
            stills, clips = [p for p in media if not p.video], [p for p in media if p.video]
            question = text
            if stills:
                question = add_image_placeholders(question, len(stills), first_turn=True, start=n + 1)
            if clips:
                try:
                    question = add_video_placeholders(question, num_frames * len(clips))
                except UserError as e:
                    raise APIError(400, f"messages: {e}", "messages", "placeholder_mismatch") from None
            n += len(stills) + num_frames * len(clips)
            parts += stills + clips
        return question, history, "\n".join(system) if system else None, parts, roles

    def render(self, req: ChatRequest, thinking: Optional[bool] = None, tools: Optional[ToolSetup] = None,
               reasoning: Optional[str] = None) -> Prompt:
        """The prompt of `req.messages` (blocking: fetches and decodes media; call it off the event loop);
        `thinking` as `thinking.py` says (the request's, resolved); `tools` the request's (`tools.request_tools`);
        `reasoning` (GPT-OSS) the level written in the system message."""
        max_tiles = req.max_tiles if req.max_tiles is not None else self.max_tiles
        num_frames = req.num_frames or self.num_frames
        question, history, system, parts, roles = self._conversation(*self._turns(req, tools), num_frames)
        shown = tools.shown if tools else None
        n_text = sum(text_bytes(t) for t in [question, system or "", dumps([t.spec for t in shown[1]]) if shown else ""]
                     + [t for pair in history for t in pair])
        n_videos = sum(p.video for p in parts)
        self.budget.request(n_text, len(parts) - n_videos, num_frames * n_videos)
        video_pixels = 0
        for part in parts:  # fetched and counted from headers; nothing decoded
            video_pixels = self._measure(part, max_tiles, num_frames, video_pixels)
        self.budget.media(n_text, [t for p in parts for t in ([1] * p.frames if p.video else [p.num_tiles])])
        specs: List[ImageSpec] = []
        for part in parts:
            specs += self._video(part) if part.video else [self._image(part, max_tiles)]
        if reasoning is not None:
            proc = self.processor
            try:
                system = with_reasoning_level(system if system is not None else (
                    proc.renderer.system_message or proc.template.system_message), reasoning)
            except UserError as e:
                raise APIError(400, f"reasoning_effort: {e}", "reasoning_effort", "unsupported_value") from None
        return self._prompt(req, chat_messages(question, history), roles, system, specs, thinking, shown)

    def _prompt(self, req: ChatRequest, messages, roles, system: Optional[str], specs: List[ImageSpec],
                thinking: Optional[bool] = None, tools=None) -> Prompt:
        proc = self.processor
        slots = iter(roles)
        messages = [(next(slots), t) if r == USER else (r, t) for r, t in messages]
        try:
            rendered = proc.renderer.render(messages, [s.num_tiles for s in specs], system, thinking=thinking,
                                            tools=tools)
        except UserError as e:
            raise APIError(400, f"messages: {e}", "messages", "placeholder_mismatch") from None
        ids, n_tiles = rendered.ids, sum(s.num_tiles for s in specs)
        max_tokens = req.max_completion_tokens or req.max_tokens or self.default_max_tokens
        try:
            if self.routed and n_tiles:  # refused only if it cannot fit routed; the limit is counted once routed
                proc.check_length(len(ids), n_tiles, routed=True)
            else:
                max_tokens = proc.clamp_max_tokens(len(ids), max_tokens)
        except UserError as e:
            raise APIError(400, f"messages: {e}", "messages", "context_length_exceeded") from None
        keyed = list(ids)
        for spec, (start, end) in zip(specs, rendered.image_spans):
            keyed[start:end] = [spec.pseudo_id] * (end - start)
        return Prompt(ids, keyed, specs, max_tokens)

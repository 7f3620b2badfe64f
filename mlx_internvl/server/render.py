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
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

from ..errors import UserError
from ..processing import add_image_placeholders, add_video_placeholders, frame_to_tile, image_to_tiles
from ..templates import ASSISTANT, USER, chat_messages
from ..video import load_video_frames
from .media import Media, MediaPolicy, decode_image, fetch
from .protocol import APIError, ChatRequest, ImagePart, TextPart, VideoPart


@dataclass
class ImageSpec:
    """One `<image>` of the prompt (an image or a video frame), in prompt order."""

    key: Tuple  # image-feature cache key: (sha256 of the bytes, max_tiles) or (video sha256, frames, index)
    num_tiles: int
    tiles: Optional[np.ndarray]  # [T, S, S, 3]; None when the tile count was known and the image not decoded
    load: Callable[[], np.ndarray]  # decodes and tiles the image again (when its features are not cached)

    @property
    def pseudo_id(self) -> int:
        return -1 - int(hashlib.sha256(repr(self.key).encode()).hexdigest()[:12], 16)


@dataclass
class Prompt:
    ids: List[int]
    keyed: List[int]  # ids with each image's tokens replaced by its pseudo id (the prompt-cache key)
    images: List[ImageSpec]
    max_tokens: int


class Renderer:
    """Builds `Prompt`s on request threads (no MLX arrays here: those belong to the generation thread)."""

    def __init__(self, processor, policy: MediaPolicy, max_tiles: Optional[int] = None, num_frames: int = 8,
                 default_max_tokens: int = 1024, known_size: int = 4096):
        self.processor, self.policy = processor, policy
        self.max_tiles, self.num_frames, self.default_max_tokens = max_tiles, num_frames, default_max_tokens
        self._known: OrderedDict[Tuple, int] = OrderedDict()  # image key -> tile count, to skip re-decoding
        self._known_size = known_size
        self._lock = threading.Lock()

    def _image(self, part: ImagePart, param: str, max_tiles) -> ImageSpec:
        media = fetch(part.image_url.url, param, self.policy)
        key = (media.digest, max_tiles)
        config = self.processor.config

        def load() -> np.ndarray:
            return image_to_tiles(decode_image(media, param, self.policy.max_pixels), config, max_tiles)

        with self._lock:
            n = self._known.get(key)
            if n is not None:
                self._known.move_to_end(key)
        if n is not None:
            return ImageSpec(key, n, None, load)
        tiles = load()
        with self._lock:
            self._known[key] = tiles.shape[0]
            while len(self._known) > self._known_size:
                self._known.popitem(last=False)
        return ImageSpec(key, tiles.shape[0], tiles, load)

    def _video(self, part: VideoPart, param: str, num_frames: int) -> List[ImageSpec]:
        media: Media = fetch(part.video_url.url, param, self.policy)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "video"
            path.write_bytes(media.data)
            try:
                frames = load_video_frames(path, num_frames=num_frames)
            except UserError as e:
                raise APIError(400, f"{param}: {e}".replace(str(path), "the video"), param, "invalid_video") from None
        specs = []
        for i, frame in enumerate(frames):
            tiles = frame_to_tile(frame, self.processor.config)
            specs.append(ImageSpec((media.digest, num_frames, i), 1, tiles, lambda t=tiles: t))
        return specs

    def _turns(self, req: ChatRequest) -> Tuple[List[str], List[list]]:
        """(system texts, [role, text, media] turns with consecutive same-role messages merged); media fetched."""
        max_tiles = req.max_tiles if req.max_tiles is not None else self.max_tiles
        num_frames = req.num_frames or self.num_frames
        system: List[str] = []
        turns: List[list] = []  # [role, text, [ImageSpec]] with consecutive same-role messages merged
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
            role = USER if m.role == "user" else ASSISTANT
            if not turns and role == ASSISTANT:
                raise APIError(400, f"{where}: the conversation must start with a user message", where)
            images, n_videos = [], 0
            for j, p in enumerate(parts):
                param = f"{where}.content.{j}"
                if isinstance(p, TextPart):
                    continue
                if role == ASSISTANT:
                    raise APIError(400, f"{param}: assistant messages can only hold text", param)
                if isinstance(p, ImagePart):
                    images.append(self._image(p, param + ".image_url", max_tiles))
                else:
                    n_videos += 1
                    if n_videos > 1:
                        raise APIError(400, f"{param}: one video per message is supported", param)
                    images.append(("video", self._video(p, param + ".video_url", num_frames)))
            if turns and turns[-1][0] == role:
                turns[-1][1] += "\n" + text
                turns[-1][2] += images
            else:
                turns.append([role, text, images])
        if not turns or turns[-1][0] != USER:
            raise APIError(400, "messages: the last message must be a user message (the turn to answer)", "messages")
        return system, turns

    def render(self, req: ChatRequest) -> Prompt:
        """The prompt of `req.messages` (blocking: fetches and decodes media; call it off the event loop)."""
        proc = self.processor
        system, turns = self._turns(req)
        history, question, specs = [], None, []
        for role, text, media in turns:
            if role == ASSISTANT:
                history.append((question, text.strip()))
                continue
            stills = [s for s in media if isinstance(s, ImageSpec)]
            frames = [f for s in media if not isinstance(s, ImageSpec) for f in s[1]]
            question = text
            if stills:  # the rule of ChatSession._add_media: images first, then the video's frames
                question = add_image_placeholders(question, len(stills), first_turn=True, start=len(specs) + 1)
            if frames:
                question = add_video_placeholders(question, len(frames))
            specs += stills + frames
        num_tiles = [s.num_tiles for s in specs]
        try:
            rendered = proc.renderer.render(chat_messages(question, history), num_tiles,
                                            "\n".join(system) if system else None)
        except UserError as e:
            raise APIError(400, f"messages: {e}", "messages", "placeholder_mismatch") from None
        ids = rendered.ids
        try:
            max_tokens = proc.clamp_max_tokens(len(ids), req.max_completion_tokens or req.max_tokens
                                               or self.default_max_tokens)
        except UserError as e:
            raise APIError(400, f"messages: {e}", "messages", "context_length_exceeded") from None
        keyed = list(ids)
        for spec, (start, end) in zip(specs, rendered.image_spans):
            keyed[start:end] = [spec.pseudo_id] * (end - start)
        return Prompt(ids, keyed, specs, max_tokens)

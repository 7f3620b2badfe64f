"""Images, video frames and text to model inputs, exactly as the upstream model-card code does it.

- `dynamic_preprocess`: pick the tile grid whose aspect ratio is closest to the image's (ties go to the later
  candidate while the image covers more than half of its canvas; candidates in upstream's set order), resize with
  PIL's default bicubic, crop row-major, and add a whole-image thumbnail when there is more than one tile.
- Video frames are one tile each: `dynamic_preprocess(max_num=1)`, a plain 448x448 bicubic resize, no thumbnail.
- `Processor.__call__`: the prompt of upstream `chat()` (template, default system message, `<image>\\n` prefix,
  `Image-k:` lines for several images, `Frame-k:` lines for video frames), every `<image>` expanded to
  `<img><IMG_CONTEXT>*n</img>`, tokenized with the tokenizer's own BOS rule. Tiles are concatenated in the order
  their placeholders appear in the prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np
from PIL import Image

from . import validate
from .config import ModelConfig
from .errors import UserError
from .images import ImageInput, open_image
from .render import Rendered, Renderer
from .templates import chat_messages, get_template, template_from_chat_template
from .tokenizer import IMG_CONTEXT, load_tokenizer
from .video import load_video_frames

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FRAME_LABEL = "Frame-{k}: "  # upstream README/training form; older InternVL2 model cards wrote "Frame{k}: "
IMAGE_LABEL = "Image-{k}: "

MaxTiles = Union[None, int, Sequence[Optional[int]]]


def as_image_list(images) -> list:
    """`images` as a list: None -> [], one image (path, URL, bytes, PIL image) -> [it], a list/tuple as is."""
    if images is None:
        return []
    if isinstance(images, (str, Path, bytes, bytearray, Image.Image)):
        return [images]
    if not isinstance(images, (list, tuple)):
        raise UserError(f"images: expected a list of paths, URLs, bytes or PIL images, got {type(images).__name__}")
    return list(images)


def load_image(source: ImageInput, exif_transpose: bool = False) -> Image.Image:
    """A path, URL, raw bytes or PIL image, as an RGB PIL image (as upstream: `Image.open(...).convert('RGB')`)."""
    return open_image(source, exif_transpose=exif_transpose)


def target_ratios(min_num: int, max_num: int) -> List[Tuple[int, int]]:
    """Candidate (cols, rows) grids with min_num <= cols*rows <= max_num, by area; equal areas keep the order in
    which upstream's Python set yields them (the same set built the same way gives the same order)."""
    grids = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return sorted(grids, key=lambda g: g[0] * g[1])


def find_closest_aspect_ratio(
    aspect_ratio: float, ratios: Sequence[Tuple[int, int]], width: int, height: int, image_size: int
) -> Tuple[int, int]:
    """Upstream's selection: smallest |aspect - cols/rows|; on an exact tie the later candidate wins while the
    image area exceeds half of that candidate's canvas."""
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for cols, rows in ratios:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def tile_grid(width: int, height: int, min_num: int, max_num: int, image_size: int) -> Tuple[int, int]:
    """The (cols, rows) grid `dynamic_preprocess` uses for a `width x height` image."""
    return find_closest_aspect_ratio(width / height, target_ratios(min_num, max_num), width, height, image_size)


def dynamic_preprocess(
    image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> List[Image.Image]:
    """Split an image into `image_size` tiles on the best grid, plus a thumbnail when there are several."""
    if not isinstance(image, Image.Image):
        raise UserError(f"image: expected a PIL image, got {type(image).__name__}; open a file or URL with "
                        "mlx_internvl.images.open_image first")
    min_num = validate.integer("min_num", min_num, minimum=1)
    max_num = validate.integer("max_num", max_num, minimum=min_num, fix="max tiles must be >= min tiles")
    image_size = validate.integer("image_size", image_size, minimum=1)
    width, height = image.size
    cols, rows = tile_grid(width, height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows))  # PIL default resample: bicubic
    tiles = []
    for k in range(cols * rows):
        c, r = k % cols, k // cols
        tiles.append(resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)))
    if adds_thumbnail(len(tiles), use_thumbnail):
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def adds_thumbnail(n_tiles: int, use_thumbnail: bool) -> bool:
    """Upstream's rule: a whole-image thumbnail follows the tiles when there is more than one tile."""
    return use_thumbnail and n_tiles != 1


def _tile_range(config: ModelConfig, max_tiles: Optional[int]) -> Tuple[int, int]:
    """(min, max) tiles per image: the config's, with `max_tiles` in place of its maximum when given."""
    max_num = config.max_dynamic_patch if max_tiles is None else max_tiles
    return min(config.min_dynamic_patch, max_num), max_num


def tile_count(width: int, height: int, config: ModelConfig, max_tiles: Optional[int] = None) -> int:
    """How many tiles (thumbnail included) `image_to_tiles` makes of a `width x height` image, without the pixels."""
    if not config.dynamic_image_size:
        return 1
    cols, rows = tile_grid(width, height, *_tile_range(config, max_tiles), config.force_image_size)
    return cols * rows + adds_thumbnail(cols * rows, config.use_thumbnail)


def tile_pixels(tiles: Sequence[Image.Image], image_size: int) -> np.ndarray:
    """PIL tiles -> `[T, S, S, 3]` uint8 (resized to S if needed, bicubic): a quarter of the float32 size, for
    holding tiles until they are encoded."""
    out = np.empty((len(tiles), image_size, image_size, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        if tile.mode != "RGB":
            tile = tile.convert("RGB")
        if tile.size != (image_size, image_size):
            tile = tile.resize((image_size, image_size), Image.BICUBIC)
        out[i] = np.asarray(tile, dtype=np.uint8)
    return out


def normalize_pixels(pixels: np.ndarray) -> np.ndarray:
    """`[T, S, S, 3]` uint8 -> float32: /255, ImageNet mean/std (the same float32 operations, in the same order, as
    torchvision's ToTensor + Normalize), one tile at a time."""
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)
    std = np.array(IMAGENET_STD, dtype=np.float32)
    out = np.empty(pixels.shape, dtype=np.float32)
    for i, tile in enumerate(pixels):
        out[i] = (tile.astype(np.float32) / np.float32(255) - mean) / std
    return out


def normalize_tiles(tiles: Sequence[Image.Image], image_size: int) -> np.ndarray:
    """PIL tiles -> `[T, S, S, 3]` float32, normalized (`tile_pixels`, then `normalize_pixels`)."""
    return normalize_pixels(tile_pixels(tiles, image_size))


def image_to_pixels(image: Image.Image, config: ModelConfig, max_tiles: Optional[int] = None) -> np.ndarray:
    """One image -> `[T, S, S, 3]` uint8 tiles, with the checkpoint's tiling settings (`tile_count` tiles)."""
    size = config.force_image_size
    if config.dynamic_image_size:
        tiles = dynamic_preprocess(image, *_tile_range(config, max_tiles), size, config.use_thumbnail)
    else:
        tiles = [image]
    return tile_pixels(tiles, size)


def image_to_tiles(image: Image.Image, config: ModelConfig, max_tiles: Optional[int] = None) -> np.ndarray:
    """One image -> `[T, S, S, 3]` normalized tiles, with the checkpoint's tiling settings."""
    return normalize_pixels(image_to_pixels(image, config, max_tiles))


def frame_to_pixels(frame: Image.Image, config: ModelConfig) -> np.ndarray:
    """One video frame -> `[1, S, S, 3]` uint8: upstream `load_video` tiles frames with `max_num=1` (a plain
    resize)."""
    size = config.force_image_size
    return tile_pixels(dynamic_preprocess(frame, 1, 1, size, config.use_thumbnail), size)


def frame_to_tile(frame: Image.Image, config: ModelConfig) -> np.ndarray:
    """One video frame -> `[1, S, S, 3]` normalized."""
    return normalize_pixels(frame_to_pixels(frame, config))


def image_lines(n: int, start: int = 1, label: Optional[str] = IMAGE_LABEL) -> str:
    """`n` placeholder lines: `Image-{start}: <image>\\n`, ... (label None: bare `<image>\\n` lines)."""
    return "".join(((label or "").format(k=start + i)) + "<image>\n" for i in range(n))


def add_image_placeholders(question: str, n_images: int, first_turn: bool = True, start: int = 1) -> str:
    """Upstream `chat()`'s rule: with images and no `<image>` in the question, prefix `<image>\\n` (one image) or
    the model-card lines `Image-1: <image>\\n...` (several). Only for the first turn, as upstream. `start` numbers
    images added later in a conversation (`Image-{start}:`), so an image added in turn k keeps a unique name."""
    if n_images == 0 or "<image>" in question or not first_turn:
        return question
    if n_images == 1 and start == 1:
        return "<image>\n" + question
    return image_lines(n_images, start) + question


def add_video_placeholders(question: str, n_frames: int, frame_label: str = FRAME_LABEL) -> str:
    """`Frame-1: <image>\\n...Frame-N: <image>\\n` in place of `<video>` (training's convention), else before the
    question (the README's)."""
    lines = "".join(frame_label.format(k=k + 1) + "<image>\n" for k in range(n_frames))
    if "<video>" in question:
        if question.count("<video>") > 1:
            raise UserError("the prompt has more than one <video> placeholder; one video per request is supported")
        placeholder = "<video>\n" if "<video>\n" in question else "<video>"
        return question.replace(placeholder, lines, 1)
    return lines + question


def resolve_template_name(config: ModelConfig, tokenizer, override: Optional[str] = None) -> Optional[str]:
    """`override`; else the original config's `template` field; else (`-hf` checkpoints, which have no such field)
    the one the tokenizer's chat template stands for; else `internvl2_5`."""
    if override:
        return override
    if config.template and config.source_format != "hf":
        return config.template
    return template_from_chat_template(getattr(tokenizer, "chat_template", None)) or config.template


class Processor:
    """Turns text, images and video frames into `input_ids`, `pixel_values` and `num_tiles` for the model."""

    def __init__(self, tokenizer, config: ModelConfig, template: Optional[str] = None):
        self.tokenizer = tokenizer
        self.config = config
        self.template = get_template(resolve_template_name(config, tokenizer, template))
        self.image_token_id = self._token_id(IMG_CONTEXT)
        self.eos_token_id = self._token_id(self.template.stop_str)
        tokenizer.add_eos_token(self.eos_token_id)
        self.renderer = Renderer(tokenizer, self.template, config.num_image_token, self.image_token_id,
                                 config.system_message)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], config: ModelConfig, template: Optional[str] = None):
        return cls(load_tokenizer(Path(path)), config, template)

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if tid is None or (unk is not None and tid == unk and token != self.tokenizer.unk_token):
            raise UserError(f"the tokenizer has no {token!r} token; is this an InternVL tokenizer?")
        return tid

    def stop_token_ids(self, stop_on_eos: bool = False, extra_stop_tokens: Sequence = ()) -> set:
        """The ids generation stops on: the template's end token (upstream `chat()` stops on nothing else); with
        `stop_on_eos` also the tokenizer's eos; plus `extra_stop_tokens` (token strings or ids)."""
        ids = {self.eos_token_id}
        if stop_on_eos:
            ids |= set(self.tokenizer.eos_token_ids)
        if isinstance(extra_stop_tokens, (str, int)):
            extra_stop_tokens = [extra_stop_tokens]
        for t in extra_stop_tokens or ():
            if isinstance(t, str):
                ids.add(self._token_id(t))
            elif isinstance(t, int) and not isinstance(t, bool) and t in self.vocab_ids:
                ids.add(t)
            else:
                raise UserError(f"extra_stop_tokens: {t!r} is neither a token of the tokenizer nor one of its ids")
        return ids

    @property
    def vocab_ids(self) -> frozenset:
        """Every id the tokenizer has a token for (the embedding table is often padded past these)."""
        if getattr(self, "_vocab_ids", None) is None:
            self._vocab_ids = frozenset(self.tokenizer.get_vocab().values())
        return self._vocab_ids

    @property
    def system_message(self) -> Optional[str]:
        return self.config.system_message

    @property
    def context_length(self) -> Optional[int]:
        """The language model's `max_position_embeddings` (None if the config does not say)."""
        return self.config.llm_config.get("max_position_embeddings")

    def render(
        self,
        text: str,
        num_tiles: Sequence[int] = (),
        history: Optional[List[Tuple[str, str]]] = None,
        system_message: Optional[str] = None,
        num_frames: int = 0,
        frame_label: str = FRAME_LABEL,
        thinking: Optional[bool] = None,
    ) -> Rendered:
        """The request rendered as upstream `chat()` builds it (placeholders for images and frames, the template,
        image tokens expanded). `num_tiles` lists tiles per `<image>` in prompt order; the last `num_frames`
        entries are video frames."""
        n_images = len(num_tiles) - num_frames
        question = text
        if num_frames:
            if "<video>" not in question and "<image>" in question:
                raise UserError("the prompt has <image> placeholders but no <video>; put <video> where the frames go")
            question = add_video_placeholders(question, num_frames, frame_label)
            if n_images and "<image>" not in text:
                question = image_lines(n_images) + question
        else:
            question = add_image_placeholders(question, n_images, first_turn=not history)
        return self.renderer.render(chat_messages(question, history), num_tiles, system_message, thinking=thinking)

    def image_tiles(self, images: Sequence[ImageInput], max_tiles: MaxTiles = None,
                    exif_transpose: bool = False) -> List[np.ndarray]:
        """Per image, its `[T, S, S, 3]` tiles; `max_tiles` is one limit for all or one per image."""
        max_tiles = validate.max_tiles(max_tiles)
        limits = list(max_tiles) if isinstance(max_tiles, (list, tuple)) else [max_tiles] * len(images)
        if len(limits) != len(images):
            raise UserError(f"max_tiles has {len(limits)} entries for {len(images)} images")
        return [image_to_tiles(load_image(im, exif_transpose), self.config, m) for im, m in zip(images, limits)]

    def frame_tiles(self, video, num_frames: int) -> List[np.ndarray]:
        """A video file's sampled frames (tiled as they decode, so no full-size frame is kept) or PIL frames, as
        `[1, S, S, 3]` tiles."""
        if isinstance(video, (list, tuple)):
            return [frame_to_tile(f, self.config) for f in video]
        return load_video_frames(video, num_frames=num_frames, each=lambda f: frame_to_tile(f, self.config))

    def __call__(
        self,
        text: str,
        images: Optional[Sequence[ImageInput]] = None,
        max_tiles: MaxTiles = None,
        history: Optional[List[Tuple[str, str]]] = None,
        system_message: Optional[str] = None,
        video=None,
        num_frames: int = 8,
        frame_label: str = FRAME_LABEL,
        exif_transpose: bool = False,
        thinking: Optional[bool] = None,
        routed: bool = False,
    ) -> dict:
        """`{'input_ids': mx.int32 [1, L], 'pixel_values': mx.float32 [T, S, S, 3] or None, 'num_tiles': [...],
        'prompt': str, 'image_spans': [(start, end), ...]}`. `video` is a file path (decoded with PyAV,
        `num_frames` frames sampled as upstream) or a
        list of PIL frames; its frames follow the images. `thinking`: InternVL3.5's thinking switch (`thinking.py`).
        `routed`: the Flash router will shorten the prompt, so only what cannot fit even then is refused here (the
        caller checks the routed prompt)."""
        validate.conversation(text, history, system_message)
        num_frames = validate.num_frames(num_frames)
        tiles = self.image_tiles(as_image_list(images), max_tiles, exif_transpose)
        n_frames = 0
        if video is not None:
            frames = self.frame_tiles(video, num_frames)
            if not frames:
                raise UserError("video: no frames were given or decoded; pass a list of PIL frames or a video file")
            tiles += frames
            n_frames = len(frames)
        num_tiles = [t.shape[0] for t in tiles]
        rendered = self.render(text, num_tiles, history, system_message, n_frames, frame_label, thinking)
        self.check_length(len(rendered.ids), sum(num_tiles), routed)
        pixel_values = mx.array(np.concatenate(tiles)) if tiles else None
        return {
            "input_ids": mx.array([rendered.ids], dtype=mx.int32),
            "pixel_values": pixel_values,
            "num_tiles": num_tiles,
            "prompt": rendered.text,
            "image_spans": rendered.image_spans,
        }

    def clamp_max_tokens(self, n_prompt: int, max_tokens: int) -> int:
        """`max_tokens`, checked, and cut to what fits in the context after an `n_prompt`-token prompt."""
        max_tokens = validate.integer("max_tokens", max_tokens, minimum=1)
        self.check_length(n_prompt)
        ctx = self.context_length
        return min(max_tokens, ctx - n_prompt) if ctx else max_tokens

    def router_saving(self, n_tiles: int) -> int:
        """The most image tokens the Flash router can drop from a prompt of `n_tiles` tiles: every tile but the
        lowest-scored one (never above the request's quantile) cut from `num_image_token` to mlp2's share."""
        per_tile, kept = self.config.num_image_token, self.config.flash_image_token
        return (per_tile - kept) * max(n_tiles - 1, 0) if self.config.is_flash else 0

    def check_length(self, n_tokens: int, n_tiles: int = 0, routed: bool = False) -> None:
        """A clear error when a prompt does not fit in the language model's context. `routed`: `n_tokens` is the
        full-resolution length of a prompt the Flash router will shorten; refuse only what cannot fit even so."""
        ctx = self.context_length
        least = n_tokens - (self.router_saving(n_tiles) if routed else 0)
        if ctx and least >= ctx:
            tiles = (f", of which {n_tiles * self.config.num_image_token} are image tokens for {n_tiles} tiles; "
                     "use fewer images, frames or tiles (--max-tiles)") if n_tiles else ""
            also = (f" (at least {least} even if the Flash router compresses every tile it can)"
                    if least != n_tokens else "")
            raise UserError(f"the prompt is {n_tokens} tokens{also} but the model's context is {ctx} tokens "
                            f"(max_position_embeddings){tiles}")

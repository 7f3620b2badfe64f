"""Images to tiles, and text + images to model inputs, exactly as the upstream model-card code does it.

- `dynamic_preprocess`: pick the tile grid whose aspect ratio is closest to the image's (ties go to the larger grid
  while the image covers more than half of its canvas), resize with PIL's default bicubic, crop row-major, and add
  a whole-image thumbnail when there is more than one tile.
- `Processor.__call__`: the prompt of upstream `chat()` (template, default system message, `<image>\\n` prefix,
  `Image-k:` lines for several images), every `<image>` expanded to `<img><IMG_CONTEXT>*n</img>`, tokenized with
  the tokenizer's own BOS rule.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np
from PIL import Image

from .config import ModelConfig
from .errors import UserError
from .templates import build_query, get_template

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"

ImageInput = Union[str, Path, bytes, Image.Image]


def load_image(source: ImageInput) -> Image.Image:
    """A path, URL, raw bytes or PIL image, as an RGB PIL image (as upstream: `Image.open(...).convert('RGB')`)."""
    from .images import open_image

    return open_image(source)


def target_ratios(min_num: int, max_num: int) -> List[Tuple[int, int]]:
    """Candidate (cols, rows) grids with min_num <= cols*rows <= max_num, by area (ties in upstream's order)."""
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
    width, height = image.size
    cols, rows = tile_grid(width, height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows))  # PIL default resample: bicubic
    tiles = []
    for k in range(cols * rows):
        c, r = k % cols, k // cols
        tiles.append(resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def normalize_tiles(tiles: Sequence[Image.Image], image_size: int) -> np.ndarray:
    """PIL tiles -> `[T, S, S, 3]` float32: resize to S if needed (bicubic), /255, ImageNet mean/std."""
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)
    std = np.array(IMAGENET_STD, dtype=np.float32)
    out = np.empty((len(tiles), image_size, image_size, 3), dtype=np.float32)
    for i, tile in enumerate(tiles):
        if tile.mode != "RGB":
            tile = tile.convert("RGB")
        if tile.size != (image_size, image_size):
            tile = tile.resize((image_size, image_size), Image.BICUBIC)
        x = np.asarray(tile, dtype=np.uint8).astype(np.float32) / np.float32(255)
        out[i] = (x - mean) / std
    return out


def image_to_tiles(image: Image.Image, config: ModelConfig, max_tiles: Optional[int] = None) -> np.ndarray:
    """One image -> `[T, S, S, 3]` normalized tiles, with the checkpoint's tiling settings."""
    size = config.force_image_size
    if config.dynamic_image_size:
        tiles = dynamic_preprocess(
            image, config.min_dynamic_patch, max_tiles or config.max_dynamic_patch, size, config.use_thumbnail
        )
    else:
        tiles = [image]
    return normalize_tiles(tiles, size)


def expand_image_placeholders(prompt: str, num_tiles: Sequence[int], tokens_per_tile: int) -> str:
    """Replace each `<image>`, first to last, by `<img>` + `<IMG_CONTEXT>` * (tiles * tokens) + `</img>`."""
    for n in num_tiles:
        prompt = prompt.replace("<image>", IMG_START + IMG_CONTEXT * (tokens_per_tile * n) + IMG_END, 1)
    return prompt


def add_image_placeholders(question: str, n_images: int, first_turn: bool = True) -> str:
    """Upstream `chat()`'s rule: with images and no `<image>` in the question, prefix `<image>\\n` (one image) or
    the model-card lines `Image-1: <image>\\n...` (several). Only for the first turn, as upstream."""
    if n_images == 0 or "<image>" in question or not first_turn:
        return question
    if n_images == 1:
        return "<image>\n" + question
    return "".join(f"Image-{i + 1}: <image>\n" for i in range(n_images)) + question


class Processor:
    """Turns text and images into `input_ids`, `pixel_values` and `num_tiles` for `InternVLChatModel`."""

    def __init__(self, tokenizer, config: ModelConfig, template: Optional[str] = None):
        self.tokenizer = tokenizer
        self.config = config
        self.template = get_template(template or config.template)
        self.image_token_id = self._token_id(IMG_CONTEXT)
        self.eos_token_id = self._token_id(self.template.stop_str)
        tokenizer.add_eos_token(self.eos_token_id)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], config: ModelConfig, template: Optional[str] = None):
        from .tokenizer import load_tokenizer

        return cls(load_tokenizer(Path(path)), config, template)

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if tid is None or (unk is not None and tid == unk and token != self.tokenizer.unk_token):
            raise UserError(f"the tokenizer has no {token!r} token; is this an InternVL tokenizer?")
        return tid

    @property
    def system_message(self) -> Optional[str]:
        return self.config.system_message

    def prompt(
        self,
        text: str,
        num_tiles: Sequence[int] = (),
        history: Optional[List[Tuple[str, str]]] = None,
        system_message: Optional[str] = None,
    ) -> str:
        """The full prompt string with image tokens expanded."""
        question = add_image_placeholders(text, len(num_tiles), first_turn=not history)
        query = build_query(
            self.template, question, history, system_message if system_message is not None else self.system_message
        )
        count = query.count("<image>")
        if count != len(num_tiles):
            raise UserError(
                f"the prompt has {count} <image> placeholder(s) but {len(num_tiles)} image(s) were given; "
                "use one <image> per image, or none to have them added"
            )
        return expand_image_placeholders(query, num_tiles, self.config.num_image_token)

    def __call__(
        self,
        text: str,
        images: Optional[Sequence[ImageInput]] = None,
        max_tiles: Optional[int] = None,
        history: Optional[List[Tuple[str, str]]] = None,
        system_message: Optional[str] = None,
    ) -> dict:
        """`{'input_ids': mx.int32 [1, L], 'pixel_values': mx.float32 [T, S, S, 3] or None, 'num_tiles': [...]}`."""
        tiles = [image_to_tiles(load_image(im), self.config, max_tiles) for im in images or []]
        num_tiles = [t.shape[0] for t in tiles]
        prompt = self.prompt(text, num_tiles, history, system_message)
        ids = self.tokenizer.encode(prompt)
        pixel_values = mx.array(np.concatenate(tiles)) if tiles else None
        return {
            "input_ids": mx.array([ids], dtype=mx.int32),
            "pixel_values": pixel_values,
            "num_tiles": num_tiles,
            "prompt": prompt,
        }

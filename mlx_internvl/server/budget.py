"""A request's cost, counted from lengths, image headers and container metadata before anything is decoded or
tokenized, and refused when it is over this server's limits or cannot fit in the model's context.

- Text: a token covers at most `L` bytes, `L` being the longest UTF-8 spelling in the vocabulary (an upper bound on
  what any token decodes to: byte-level BPE spells each byte with a 1-2 byte character, sentencepiece spells a space
  as the 3-byte `▁` and a fallback byte as `<0xNN>`), and Unicode normalization (NFC/NFKC) can shrink text at most
  3 times (Hangul jamo to a syllable). So `bytes / (3 L)` is a lower bound on the text's tokens that never refuses
  a prompt that would fit; the explicit byte cap bounds what tokenizing can cost.
- Images: `processing.tile_count` (the tiler's own rule) of the header's width and height, times the tokens per
  tile; before the headers are read, at least one tile each. With the Flash router on, less the most image tokens
  the router could drop (`Processor.router_saving`): only a prompt that cannot fit even with every compressible tile
  compressed is refused here; the routed prompt is checked once the router has decided.
- Video: one tile per sampled frame (known from the request); decoding reads every frame up to the last sampled
  one, so its cost is that many frames times the frame size the container declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .protocol import APIError

SHRINK = 3  # the most Unicode normalization shrinks UTF-8 text (3 jamo of 3 bytes compose to one 3-byte syllable)


@dataclass(frozen=True)
class Limits:
    """Per-request caps (the `serve` options of the same names)."""

    max_images: int = 16
    max_frames: int = 64  # video frames, all videos of the request together
    max_request_tiles: int = 128  # image tiles and video frames together
    max_text_bytes: int = 1 << 20  # every text of the conversation together, in UTF-8
    max_video_pixels: int = 4000 * 10**6  # pixels decoded, all videos together


def longest_token_bytes(tokenizer) -> int:
    """The longest UTF-8 spelling of a token (added tokens included): at least the bytes any token decodes to."""
    return max((len(token.encode("utf-8")) for token in tokenizer.get_vocab()), default=1)


def text_bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


class Budget:
    """The checks, for one processor: `request` before any media is fetched, `media` once headers are read,
    `video` per video from its container."""

    def __init__(self, limits: Limits, processor, routed: bool = False):
        self.limits, self.processor, self.routed = limits, processor, routed
        self.context = processor.context_length
        self.per_tile = processor.config.num_image_token
        self.bytes_per_token = SHRINK * longest_token_bytes(processor.tokenizer)

    def request(self, n_text: int, n_images: int, n_frames: int) -> None:
        """Caps on images, frames and text, and whether the prompt could fit at all (each image at least 1 tile)."""
        lim = self.limits
        if n_images > lim.max_images:
            raise APIError(400, f"messages: {n_images} images, over this server's limit of {lim.max_images} per "
                                "request (--max-images)", "messages", "too_many_images")
        if n_frames > lim.max_frames:
            raise APIError(400, f"messages: {n_frames} video frames, over this server's limit of {lim.max_frames} "
                                "per request (--max-frames); ask for fewer with num_frames", "messages",
                           "too_many_frames")
        if n_text > lim.max_text_bytes:
            raise APIError(413, f"messages: {n_text} bytes of text, over this server's limit of "
                                f"{lim.max_text_bytes} bytes per request (--max-text-kb)", "messages", "text_too_long")
        self._tiles(n_images + n_frames, "at least ")
        self._fits(n_text, n_images + n_frames, "at least ")

    def media(self, n_text: int, num_tiles: Sequence[int]) -> None:
        """The same with every image's and frame's tile count known (from headers and the request)."""
        self._tiles(sum(num_tiles), "")
        self._fits(n_text, sum(num_tiles), "")

    def video(self, param: str, width: int, height: int, decoded: int, so_far: int, max_pixels: int) -> int:
        """Pixels decoding this video costs (`decoded` frames of `width` x `height`), added to `so_far`, checked."""
        if width < 1 or height < 1:
            raise APIError(400, f"{param}: the video's container does not say its frame size, so what decoding it "
                                "costs cannot be counted; re-encode it (e.g. as MP4/H.264)", param, "invalid_video")
        if width * height > max_pixels:
            raise APIError(400, f"{param}: {width}x{height} pixels per frame is over this server's limit of "
                                f"{max_pixels} (a decompression bomb?)", param, "video_too_large")
        total = so_far + decoded * width * height
        if total > self.limits.max_video_pixels:
            raise APIError(400, f"{param}: decoding the sampled frames means decoding {decoded} frames of "
                                f"{width}x{height} ({total / 1e6:.0f} megapixels with the request's other videos), "
                                f"over this server's limit of {self.limits.max_video_pixels / 1e6:.0f} "
                                "(--max-video-megapixels); send a shorter or smaller clip", param, "video_too_large")
        return total

    def _tiles(self, tiles: int, least: str) -> None:
        if tiles > self.limits.max_request_tiles:
            raise APIError(400, f"messages: {least}{tiles} tiles (images' tiles and video frames), over this server's "
                                f"limit of {self.limits.max_request_tiles} per request (--max-request-tiles); send "
                                "fewer images or frames, or a lower max_tiles", "messages", "too_many_tiles")

    def _fits(self, n_text: int, tiles: int, least: str) -> None:
        if not self.context:
            return
        text = -(-n_text // self.bytes_per_token)
        image = tiles * self.per_tile - (self.processor.router_saving(tiles) if self.routed else 0)
        n = text + image
        if n >= self.context:
            routed = ", even if the Flash router compresses every tile it can" if self.routed and tiles > 1 else ""
            raise APIError(400, f"messages: the prompt is at least {n} tokens ({image} image tokens for {least}"
                                f"{tiles} tiles{routed}, and at least {text} for {n_text} bytes of text) but the "
                                f"model's context is {self.context} tokens (max_position_embeddings); use fewer "
                                "images, frames or tiles (max_tiles), or less text", "messages",
                           "context_length_exceeded")

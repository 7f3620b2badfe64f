"""Video files to frames, sampled the way the official model card's `load_video` samples them.

Decoding uses PyAV (the optional `[video]` extra; upstream uses decord, which has no macOS arm64 wheels). Frame k of
`num_segments` is `int(start + seg/2 + round(seg*k))` with `seg = (end - start) / num_segments` over frame indices
`[0, len-1]` (numpy's round-half-to-even, as upstream), optionally limited to a `bound` of (start, end) seconds.
Each frame later becomes one 448x448 tile (`processing.frame_to_tile`); `load_video_frames(each=...)` tiles frames as
they decode, so a long 4K clip never holds more than one full-size frame. `video_header` reads the frame count and
size from the container, for counting a video's cost before decoding it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
from PIL import Image

from . import validate
from .errors import UserError

logger = logging.getLogger("mlx_internvl")
DEFAULT_NUM_FRAMES = 8  # the model-card video examples use 8 segments
T = TypeVar("T")


def frame_indices(num_frames_in_video: int, fps: float, num_segments: int,
                  bound: Optional[Tuple[float, float]] = None, first_idx: int = 0) -> List[int]:
    """The model card's `get_index`: `num_segments` frame indices spread over the video (or over `bound`)."""
    num_segments = validate.num_frames(num_segments)
    bound = validate.bound(bound)
    max_frame = validate.integer("frame count", num_frames_in_video, minimum=1) - 1
    fps = validate.number("fps", fps, minimum=0, min_open=True)
    start, end = bound if bound else (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    if start_idx > end_idx:
        raise UserError(f"bound {bound}: starts after the video ends (at {(max_frame + 1) / fps:.2f} s); give a "
                        "start within the video")
    seg = float(end_idx - start_idx) / num_segments
    return [int(start_idx + seg / 2 + np.round(seg * k)) for k in range(num_segments)]


def _av():
    try:
        import av
    except ImportError as e:
        raise UserError("video input needs PyAV: pip install 'mlx-internvl[video]' (or pip install av)") from e
    return av


def _open(path: Path):
    av = _av()
    if not path.exists():
        raise UserError(f"video {path}: no such file")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise UserError(f"video {path}: not a readable video file ({e})") from e
    if not container.streams.video:
        container.close()
        raise UserError(f"video {path}: has no video stream")
    return container


@dataclass(frozen=True)
class VideoHeader:
    """What the container says about its first video stream, read without decoding a frame."""

    frames: int
    fps: float
    width: int
    height: int


def video_header(path: Union[str, Path]) -> VideoHeader:
    """Frame count, average frame rate and frame size of the first video stream (no frame is decoded)."""
    path = validate.path("video", path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        n = stream.frames
        if not n:  # some containers carry no frame count: count the packets instead (no decoding)
            n = sum(1 for p in container.demux(stream) if p.size)
    finally:
        container.close()
    if n <= 0 or fps <= 0:
        raise UserError(f"video {path}: no frames or no frame rate could be read")
    return VideoHeader(n, fps, width, height)


def video_info(path: Union[str, Path]) -> Tuple[int, float]:
    """(frame count, average frames per second) of the first video stream."""
    header = video_header(path)
    return header.frames, header.fps


def _check_frame(path: Path, width: int, height: int, max_pixels: Optional[int]) -> None:
    if max_pixels and width * height > max_pixels:
        raise UserError(f"video {path}: {width}x{height} pixels per frame is over the limit of {max_pixels} "
                        "(a decompression-bomb guard; raise max_pixels if you trust the file)")


def _decode(path: Path, wanted: Sequence[int], each: Callable, max_pixels: Optional[int]) -> Tuple[dict, int]:
    av = _av()
    targets, last = set(wanted), max(wanted)
    frames, n = {}, 0
    container = _open(path)
    try:
        for i, frame in enumerate(container.decode(video=0)):
            n = i + 1
            _check_frame(path, frame.width, frame.height, max_pixels)  # a stream may change size midway
            if i in targets:
                frames[i] = each(frame.to_image())  # RGB24 PIL image; only one full-size frame is alive at a time
            if i >= last:
                break
    except av.error.FFmpegError as e:
        raise UserError(f"video {path}: decoding failed at frame {n} ({e})") from e
    finally:
        container.close()
    return frames, n


def load_video_frames(path: Union[str, Path], num_frames: int = DEFAULT_NUM_FRAMES,
                      bound: Optional[Tuple[float, float]] = None, each: Optional[Callable[[Image.Image], T]] = None,
                      max_pixels: Optional[int] = None) -> List[T]:
    """`num_frames` RGB frames of the video at `path`, at the model card's frame indices (over `bound`, a (start,
    end) in seconds, when given). `each` (e.g. a tiler) is applied to every frame as it is decoded, so the list
    holds its results instead of full-size frames. Frames larger than `max_pixels` (default: Pillow's
    `MAX_IMAGE_PIXELS`) are refused, from the header first."""
    path = validate.path("video", path)
    num_frames, bound = validate.num_frames(num_frames), validate.bound(bound)
    max_pixels = validate.integer("max_pixels", max_pixels, minimum=1, allow_none=True)
    if each is not None and not callable(each):
        raise UserError(f"each: expected a function of one frame, got {type(each).__name__}")
    each = each or (lambda frame: frame)
    max_pixels = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    header = video_header(path)
    _check_frame(path, header.width, header.height, max_pixels)
    idx = frame_indices(header.frames, header.fps, num_frames, bound)
    frames, decoded = _decode(path, idx, each, max_pixels)
    if len(frames) < len(set(idx)):
        # The container's frame count was larger than what decodes: sample again over the frames that exist.
        logger.warning("video %s: %d frames decode, the container said %d; resampling", path, decoded, header.frames)
        if decoded == 0:
            raise UserError(f"video {path}: no frame could be decoded")
        idx = frame_indices(decoded, header.fps, num_frames, bound)
        frames, _ = _decode(path, idx, each, max_pixels)
    return [frames[i] for i in idx]

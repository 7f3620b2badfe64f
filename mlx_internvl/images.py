"""Opening images from paths, URLs, bytes or PIL objects, with errors that say which input and why.

Colour handling follows upstream exactly: `Image.open(...).convert('RGB')`, whatever the mode. That means alpha is
dropped, not composited on white (transformers' image processors composite; upstream does not), and 16-bit
greyscale is clipped at 255 by Pillow, not rescaled (a warning says so).

EXIF orientation is *not* applied by default, because the official preprocessing does not apply it and parity with
the official model card matters more; `exif_transpose=True` (CLI `--exif-transpose`) rotates photos as a viewer
would. Images larger than Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, about 89 megapixels)
are refused with an error (the size is read from the header, before decoding), unless `max_pixels` says otherwise.
URLs are downloaded within an overall deadline (`URL_DEADLINE_S`) and size cap (`URL_MAX_BYTES`).
"""

from __future__ import annotations

import io
import logging
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

ImageInput = Union[str, Path, bytes, bytearray, Image.Image]
logger = logging.getLogger("mlx_internvl")

EXIF_ORIENTATION = 0x0112
URL_TIMEOUT_S = 30  # per read
URL_DEADLINE_S = 60  # for the whole download
URL_MAX_BYTES = 64 << 20


def describe(source) -> str:
    """A short name for an image input, for error messages."""
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.width}x{source.height} {source.mode}>"
    return str(source)


def _read_url(url: str, deadline_s: Optional[float] = None, max_bytes: Optional[int] = None) -> bytes:
    """The body at `url`, within an overall deadline and a size cap (a server that trickles bytes or sends an
    endless body is cut off, not waited for)."""
    deadline_s = URL_DEADLINE_S if deadline_s is None else deadline_s
    max_bytes = URL_MAX_BYTES if max_bytes is None else max_bytes
    end = time.monotonic() + deadline_s
    try:
        with urllib.request.urlopen(url, timeout=min(URL_TIMEOUT_S, deadline_s)) as r:
            declared = r.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise UserError(f"image {url}: {int(declared)} bytes is over the {max_bytes}-byte limit for "
                                "downloaded images; download it yourself and pass the file")
            sock = getattr(getattr(getattr(r, "fp", None), "raw", None), "_sock", None)
            chunks, size = [], 0
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    raise UserError(f"image {url}: the download took longer than {deadline_s:g} s; check the URL "
                                    "or download the file and pass its path")
                if sock is not None:
                    sock.settimeout(min(left, URL_TIMEOUT_S))
                chunk = r.read1(65536) if hasattr(r, "read1") else r.read(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise UserError(f"image {url}: more than {max_bytes} bytes, the limit for downloaded images; "
                                    "download it yourself and pass the file")
                chunks.append(chunk)
            return b"".join(chunks)
    except UserError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        if time.monotonic() >= end:
            raise UserError(f"image {url}: the download took longer than {deadline_s:g} s; check the URL or "
                            "download the file and pass its path") from e
        raise UserError(f"image {url}: cannot be downloaded ({getattr(e, 'reason', e)})") from e


def _open(source) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    text = str(source)
    if text.startswith(("http://", "https://")):
        return Image.open(io.BytesIO(_read_url(text)))
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"image {path}: no such file")
    if path.is_dir():
        raise UserError(f"image {path}: is a directory, expected an image file")
    return Image.open(path)


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright; 2..8 = flipped/rotated), 1 when there is none."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # malformed EXIF blocks raise a variety of errors; they just mean "no orientation"
        return 1


def _check_size(source, width: int, height: int, limit: Optional[int]) -> None:
    if width < 1 or height < 1:
        raise UserError(f"image {describe(source)}: {width}x{height} pixels; an image needs at least one pixel "
                        "in each direction")
    if limit and width * height > limit:
        raise UserError(f"image {describe(source)}: too large to decode safely ({width}x{height} pixels is over "
                        f"the limit of {limit}, a decompression-bomb guard). If you trust this file, raise the limit "
                        "(max_pixels=..., or PIL.Image.MAX_IMAGE_PIXELS).")


def open_image(source: ImageInput, exif_transpose: bool = False, max_pixels: Optional[int] = None) -> Image.Image:
    """An RGB PIL image from a path, http(s) URL, raw bytes or a PIL image, converted as upstream converts it.

    The pixel count is checked from the header, before any pixel is decoded; Pillow's global
    `MAX_IMAGE_PIXELS` is read, never changed, so this is safe to call from several threads."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, Image.Image):
        image = source
        _check_size(source, image.width, image.height, limit)
    else:
        if not isinstance(source, (str, Path, bytes, bytearray)):
            raise UserError(f"image {describe(source)}: expected a path, an http(s) URL, bytes or a PIL image, got "
                            f"{type(source).__name__}")
        try:
            image = _open(source)
            _check_size(source, image.width, image.height, limit)
            image.load()
        except UserError:
            raise
        except Image.DecompressionBombError as e:
            raise UserError(
                f"image {describe(source)}: too large to decode safely ({e}). If you trust this file, raise the "
                "limit (PIL.Image.MAX_IMAGE_PIXELS)."
            ) from e
        except UnidentifiedImageError as e:
            raise UserError(f"image {describe(source)}: not a readable image file (unknown or corrupt format)") from e
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError) as e:
            # Pillow's decoders raise these on truncated or corrupt data.
            raise UserError(f"image {describe(source)}: cannot be decoded ({type(e).__name__}: {e})") from e
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    elif exif_orientation(image) != 1:
        logger.info("image %s has EXIF orientation %d; used as stored, like upstream "
                    "(--exif-transpose or exif_transpose=True rotates it)", describe(source), exif_orientation(image))
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F") and image.getextrema()[1] > 255:
        logger.warning("image %s is %s with values above 255; converting to RGB clips them to white, as upstream "
                       "does. Rescale it to 8 bits first for a faithful picture.", describe(source), image.mode)
    try:
        return image.convert("RGB") if image.mode != "RGB" else image
    except (OSError, ValueError) as e:
        raise UserError(f"image {describe(source)}: cannot convert mode {image.mode} to RGB ({e})") from e

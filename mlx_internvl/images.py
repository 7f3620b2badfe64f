"""Opening images from paths, URLs, bytes or PIL objects, with errors that say which input and why.

Colour handling follows upstream exactly: `Image.open(...).convert('RGB')`, whatever the mode. That means alpha is
dropped, not composited on white (transformers' image processors composite; upstream does not), and 16-bit
greyscale is clipped at 255 by Pillow, not rescaled (a warning says so).

EXIF orientation is *not* applied by default, because the official preprocessing does not apply it and parity with
the official model card matters more; `exif_transpose=True` (CLI `--exif-transpose`) rotates photos as a viewer
would. Images larger than Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, about 89 megapixels)
are refused with an error (the size is read from the header, before decoding), unless `max_pixels` says otherwise.
URLs are downloaded by `fetch.fetch_url` under `URL_POLICY` (one 60 s deadline for the whole download, a 64 MB
cap, http(s) only, redirects re-checked).
"""

from __future__ import annotations

import io
import logging
import struct
from pathlib import Path
from typing import Optional, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .fetch import FetchError, FetchPolicy, fetch_url

ImageInput = Union[str, Path, bytes, bytearray, Image.Image]
logger = logging.getLogger("mlx_internvl")

EXIF_ORIENTATION = 0x0112
# URLs given to the library or the CLI: the user named them, so a LAN or loopback host is fine; a redirect to
# another host must still land on a public address (the server is stricter: see server/media.py).
URL_POLICY = FetchPolicy(allow_private=True, deadline_s=60, max_bytes=64 << 20)


def describe(source) -> str:
    """A short name for an image input, for error messages."""
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.width}x{source.height} {source.mode}>"
    return str(source)


def _open(source) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    text = str(source)
    if text.startswith(("http://", "https://")):
        try:
            return Image.open(io.BytesIO(fetch_url(text, URL_POLICY)))
        except FetchError as e:
            raise UserError(f"image {text}: cannot be downloaded ({e}); check the URL, or download the file and "
                            "pass its path") from None
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

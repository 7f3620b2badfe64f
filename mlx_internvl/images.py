"""Opening images from paths, URLs, bytes or PIL objects, with errors that say which input and why.

Colour handling follows upstream exactly: `Image.open(...).convert('RGB')`, whatever the mode. That means alpha is
dropped, not composited on white (transformers' image processors composite; upstream does not), and 16-bit
greyscale is clipped at 255 by Pillow, not rescaled (a warning says so).

EXIF orientation is *not* applied by default, because the official preprocessing does not apply it and parity with
the official model card matters more; `exif_transpose=True` (CLI `--exif-transpose`) rotates photos as a viewer
would. Images larger than Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, about 89 megapixels)
are refused with an error instead of Pillow's warning, unless `max_pixels` raises the limit.
"""

from __future__ import annotations

import io
import logging
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Optional, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

ImageInput = Union[str, Path, bytes, bytearray, Image.Image]
logger = logging.getLogger("mlx_internvl")

EXIF_ORIENTATION = 0x0112
URL_TIMEOUT_S = 30


def describe(source) -> str:
    """A short name for an image input, for error messages."""
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.width}x{source.height} {source.mode}>"
    return str(source)


def _read_url(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as r:
            return r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
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


def open_image(source: ImageInput, exif_transpose: bool = False, max_pixels: Optional[int] = None) -> Image.Image:
    """An RGB PIL image from a path, http(s) URL, raw bytes or a PIL image, converted as upstream converts it."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, Image.Image):
        image = source
        if limit and image.width * image.height > limit:
            raise UserError(f"image {describe(source)}: {image.width}x{image.height} pixels is over the limit of "
                            f"{limit}")
    else:
        old_limit = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = limit
            with warnings.catch_warnings():
                # Pillow only warns between 1x and 2x its limit; such a file is refused here too.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = _open(source)
                image.load()
        except UserError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise UserError(
                f"image {describe(source)}: too large to decode safely ({e}). If you trust this file, raise the "
                "limit (max_pixels=..., or PIL.Image.MAX_IMAGE_PIXELS)."
            ) from e
        except UnidentifiedImageError as e:
            raise UserError(f"image {describe(source)}: not a readable image file (unknown or corrupt format)") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise UserError(f"image {describe(source)}: cannot be decoded ({e})") from e
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit
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

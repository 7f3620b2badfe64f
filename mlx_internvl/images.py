"""Opening images from paths, URLs, bytes or PIL objects, with errors that say which input and why.

Conversion to RGB follows upstream (`Image.open(...).convert('RGB')`): EXIF orientation is *not* applied, because
the official preprocessing does not apply it either and parity with it matters more; pass `exif_transpose=True`
to rotate photos as a viewer would.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

ImageInput = Union[str, Path, bytes, Image.Image]


def _describe(source) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return str(source)


def open_image(source: ImageInput, exif_transpose: bool = False) -> Image.Image:
    """An RGB PIL image from a path, http(s) URL, raw bytes or a PIL image."""
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            if isinstance(source, (bytes, bytearray)):
                image = Image.open(io.BytesIO(source))
            elif str(source).startswith(("http://", "https://")):
                import urllib.request

                with urllib.request.urlopen(str(source), timeout=30) as r:
                    image = Image.open(io.BytesIO(r.read()))
            else:
                path = Path(source).expanduser()
                if not path.exists():
                    raise UserError(f"image {path}: no such file")
                image = Image.open(path)
            image.load()
        except UserError:
            raise
        except Image.DecompressionBombError as e:
            raise UserError(f"image {_describe(source)}: too large to decode safely ({e})") from e
        except UnidentifiedImageError as e:
            raise UserError(f"image {_describe(source)}: not a readable image file") from e
        except OSError as e:
            raise UserError(f"image {_describe(source)}: cannot be read ({e})") from e
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image

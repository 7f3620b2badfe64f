"""Image and video bytes from a request: `data:` URLs always; http(s) URLs and local files only when allowed.

Remote downloads go through the library's one fetcher (`fetch.fetch_url`): one deadline for the whole download,
a size cap, http(s) only, every redirect re-checked, public addresses only unless `allow_private_hosts`; every
failure answers the same text, so a client cannot probe what is behind a URL. Local paths must resolve, symlinks
followed, inside the allowed directory. Decoding checks the pixel count from the image header before any pixel is
decoded, against the server's own limit: Pillow's global `Image.MAX_IMAGE_PIXELS` is only read, never set,
because requests decode on several threads at once.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import logging
import struct
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..fetch import FetchError, FetchPolicy, fetch_url
from ..images import open_image
from .protocol import APIError

logger = logging.getLogger("mlx_internvl.server.media")  # `serve -v` shows its debug lines
# One text for every remote URL that fails, whatever the cause (refused address, unreachable, HTTP error, slow,
# too large, not an image): otherwise a client could map the server's network from the differences.
REMOTE_FAILED = ("the URL could not be fetched (refused by this server's rules, unreachable, an HTTP error, too "
                 "slow, too large, or not an image or video); send the image as a data: URL instead")
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")  # MP4 / MOV / 3GP
# MKV/WebM, Ogg, FLV, MPEG program and video streams, ASF/WMV, Y4M
_VIDEO_MAGIC = (b"\x1a\x45\xdf\xa3", b"OggS", b"FLV", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3",
                b"\x30\x26\xb2\x75", b"YUV4MPEG2")


@dataclass(frozen=True)
class MediaPolicy:
    allow_remote: bool = False
    allow_private_hosts: bool = False  # remote URLs on loopback/private/link-local addresses (off: public only)
    local_root: Optional[Path] = None  # None: local paths refused
    max_bytes: int = 20 << 20  # per image or video
    remote_timeout_s: float = 10.0  # the whole download, connection included
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485


@dataclass
class Media:
    data: bytes
    digest: str  # sha256 of the bytes: the image-feature cache key


def _data_url(url: str, param: str, max_bytes: int) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or ";base64" not in head:
        raise APIError(400, f"{param}: a data: URL must be 'data:<mime>;base64,<data>'", param, "invalid_image_url")
    if len(payload) * 3 // 4 > max_bytes:
        raise APIError(413, f"{param}: the image is larger than the limit of {max_bytes >> 20} MB", param,
                       "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{param}: the data: URL is not valid base64 ({e})", param, "invalid_base64") from None


def _remote(url: str, param: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_remote:
        raise APIError(400, f"{param}: http(s) image URLs are not allowed on this server; send the image as a "
                            "data: URL (or start the server with --allow-remote-images)", param, "remote_not_allowed")
    rules = FetchPolicy(allow_private=policy.allow_private_hosts, deadline_s=policy.remote_timeout_s,
                        max_bytes=policy.max_bytes)
    try:
        data = fetch_url(url, rules)
        if not _looks_like_media(data):
            raise FetchError(f"the {len(data)} bytes are neither an image nor a video container")
        return data
    except FetchError as e:  # why, only in the server's own log: a client must not learn what is behind a URL
        logger.debug("%s: %r not fetched: %s", param, url[:200], str(e).replace("\n", " "))  # one line each
        raise APIError(400, f"{param}: {REMOTE_FAILED}", param, "image_download_failed") from None


def _looks_like_media(data: bytes) -> bool:
    """Whether `data` starts like an image Pillow knows or a common video container (the full checks come later;
    this one keeps "not an image" from telling a client more than any other failed fetch)."""
    try:
        Image.open(io.BytesIO(data))  # the header only
        return True
    except Image.DecompressionBombError:
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError):
        pass
    return (data[4:8] in _ISO_BOXES or data.startswith(_VIDEO_MAGIC) or data[8:12] == b"AVI "
            or (data[:1] == b"\x47" and data[188:189] == b"\x47"))


def _local(text: str, param: str, policy: MediaPolicy) -> bytes:
    if policy.local_root is None:
        raise APIError(400, f"{param}: local file paths are not allowed on this server; send the image as a data: "
                            "URL (or start the server with --allow-local-images DIR)", param, "local_not_allowed")
    if text.startswith("file://"):
        text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
    root = policy.local_root.resolve()
    if "\0" in text:  # os calls refuse it with a ValueError
        raise APIError(400, f"{param}: a file path cannot contain a NUL byte", param, "invalid_path")
    try:
        path = (root / text).resolve()  # an absolute `text` replaces root; resolve() follows symlinks
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        raise APIError(400, f"{param}: {text[:200]} cannot be opened (a symlink loop?)", param,
                       "invalid_path") from None
    if not path.is_relative_to(root):
        raise APIError(400, f"{param}: {text[:200]} is outside the allowed directory {root}", param,
                       "path_not_allowed")
    try:
        if not path.is_file():
            raise APIError(400, f"{param}: {text[:200]}: no such file under {root}", param, "file_not_found")
        if path.stat().st_size > policy.max_bytes:
            raise APIError(413, f"{param}: {text[:200]} is larger than the limit of {policy.max_bytes >> 20} MB",
                           param, "image_too_large")
        return path.read_bytes()
    except OSError as e:  # a name too long, a file that vanished or cannot be read
        raise APIError(400, f"{param}: {text[:200]} cannot be opened ({e.strerror})", param,
                       "invalid_path") from None


def fetch(url: str, param: str, policy: MediaPolicy) -> Media:
    """The bytes behind an `image_url`/`video_url` (blocking: call it off the event loop)."""
    if url.startswith("data:"):
        data = _data_url(url, param, policy.max_bytes)
    elif url.startswith(("http://", "https://")):
        data = _remote(url, param, policy)
    else:
        data = _local(url, param, policy)
    if not data:
        raise APIError(400, f"{param}: the image is empty", param, "invalid_image")
    return Media(data, hashlib.sha256(data).hexdigest())


@contextlib.contextmanager
def _image_errors(param: str):
    """Pillow's failures on a hostile or broken file, as 400s."""
    try:
        yield
    except APIError:
        raise
    except Image.DecompressionBombError as e:
        raise APIError(400, f"{param}: refused, too many pixels ({e})", param, "image_too_large") from None
    except UnidentifiedImageError:
        raise APIError(400, f"{param}: not an image (unknown or corrupt format)", param, "invalid_image") from None
    except (UserError, OSError, SyntaxError, ValueError) as e:
        raise APIError(400, f"{param}: the image cannot be decoded ({e})", param, "invalid_image") from None


def image_header(media: Media, param: str, max_pixels: int) -> Image.Image:
    """The image, its header read and its size checked, no pixel decoded (`.size` gives its tile count)."""
    with _image_errors(param):
        image = Image.open(io.BytesIO(media.data))  # reads the header only
        if image.width * image.height > max_pixels:
            raise APIError(400, f"{param}: {image.width}x{image.height} pixels is over this server's limit of "
                                f"{max_pixels} (a decompression bomb?)", param, "image_too_large")
        return image


def decode_image(media: Media, param: str, max_pixels: int) -> Image.Image:
    """An RGB image, as upstream converts it; a 400 for anything that is not a safe, readable image."""
    image = image_header(media, param, max_pixels)
    with _image_errors(param):
        image.load()
        return open_image(image, max_pixels=max_pixels)

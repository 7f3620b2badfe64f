"""Image and video bytes from a request: `data:` URLs always; http(s) URLs and local files only when allowed.

Remote downloads have a size cap and one overall deadline (a server that trickles a byte at a time cannot hold a
request past it, whatever the per-read timeout). Local paths must resolve, symlinks followed, inside the allowed
directory. Decoding checks the pixel count from the image header before any pixel is decoded, against the server's
own limit: Pillow's global `Image.MAX_IMAGE_PIXELS` is only read, never set, because requests decode on several
threads at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..images import open_image
from .protocol import APIError


@dataclass(frozen=True)
class MediaPolicy:
    allow_remote: bool = False
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
    deadline = time.monotonic() + policy.remote_timeout_s
    try:
        with urllib.request.urlopen(url, timeout=policy.remote_timeout_s) as r:
            if int(r.headers.get("Content-Length") or 0) > policy.max_bytes:
                raise APIError(413, f"{param}: the image at {url} is larger than the limit of "
                                    f"{policy.max_bytes >> 20} MB", param, "image_too_large")
            chunks, total = [], 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the download took longer than {policy.remote_timeout_s:g} s")
                _socket_timeout(r, left)  # no single read may outlast the deadline either
                block = r.read1(65536)
                if not block:
                    break
                total += len(block)
                if total > policy.max_bytes:
                    raise APIError(413, f"{param}: the image at {url} is larger than the limit of "
                                        f"{policy.max_bytes >> 20} MB", param, "image_too_large")
                chunks.append(block)
            return b"".join(chunks)
    except APIError:
        raise
    except (urllib.error.URLError, OSError, ValueError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(e, TimeoutError) or isinstance(reason, TimeoutError):
            reason = f"not downloaded within the {policy.remote_timeout_s:g} s deadline"
        raise APIError(400, f"{param}: cannot download {url} ({reason})", param, "image_download_failed") from None


def _socket_timeout(response, seconds: float) -> None:
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(max(seconds, 0.01))


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


def decode_image(media: Media, param: str, max_pixels: int) -> Image.Image:
    """An RGB image, as upstream converts it; a 400 for anything that is not a safe, readable image."""
    try:
        image = Image.open(io.BytesIO(media.data))  # reads the header only
        if image.width * image.height > max_pixels:
            raise APIError(400, f"{param}: {image.width}x{image.height} pixels is over this server's limit of "
                                f"{max_pixels} (a decompression bomb?)", param, "image_too_large")
        image.load()
        return open_image(image, max_pixels=max_pixels)
    except APIError:
        raise
    except Image.DecompressionBombError as e:
        raise APIError(400, f"{param}: refused, too many pixels ({e})", param, "image_too_large") from None
    except UnidentifiedImageError:
        raise APIError(400, f"{param}: not an image (unknown or corrupt format)", param, "invalid_image") from None
    except (UserError, OSError, SyntaxError, ValueError) as e:
        raise APIError(400, f"{param}: the image cannot be decoded ({e})", param, "invalid_image") from None

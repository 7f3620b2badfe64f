"""The server's caches and their byte budgets.

Two caches trade memory for time: mlx-lm's `LRUPromptCache` (conversations' KV caches, for their next turn) and
`FeatureCache` (encoded image features, keyed by content hash). Each is bounded by a count and by bytes; the
defaults are a share of the machine's memory (`PROMPT_CACHE_SHARE`, `VISION_CACHE_SHARE` of the physical memory,
which on Apple silicon the GPU shares), so a long conversation cannot grow the server past what the machine has.
Sizes are written as mlx-lm's server takes `--prompt-cache-bytes`: `8G`, `512MB`, `1.5GB` or plain bytes.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from decimal import InvalidOperation
from typing import Hashable, Optional

import mlx.core as mx
from mlx_lm.models.cache import LRUPromptCache
from mlx_lm.utils import _parse_size

from ..errors import UserError

PROMPT_CACHE_SHARE = 1 / 4
VISION_CACHE_SHARE = 1 / 32


def machine_memory() -> int:
    """Physical memory in bytes (what `sysconf` reports; MLX's device info where sysconf cannot tell)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return int(mx.device_info().get("memory_size", 16 << 30))


def default_prompt_cache_bytes() -> int:
    return int(machine_memory() * PROMPT_CACHE_SHARE)


def default_vision_cache_bytes() -> int:
    return int(machine_memory() * VISION_CACHE_SHARE)


def parse_size(text, name: str = "size") -> int:
    """Bytes from `8G`, `512MB`, `1.5GB`, `100M` or `1000000` (mlx-lm's server's syntax; M and G are 10**6, 10**9)."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    try:
        return _parse_size(str(text).strip())
    except (KeyError, InvalidOperation, ValueError, ArithmeticError):
        raise UserError(f"{name}: expected a size such as 8G, 512MB, 1.5GB or a number of bytes, got {text!r}"
                        ) from None


def prompt_cache(max_entries: int, max_bytes: Optional[int]) -> LRUPromptCache:
    """mlx-lm's prompt cache, bounded by `max_entries` and `max_bytes` (None: the default share of memory)."""
    return LRUPromptCache(max_size=max_entries,
                          max_bytes=default_prompt_cache_bytes() if max_bytes is None else max_bytes)


class FeatureCache:
    """Least-recently-used image features, at most `max_entries` of them and `max_bytes` in all (None: the default
    share of memory). A feature array larger than the whole budget is not kept."""

    def __init__(self, max_entries: int, max_bytes: Optional[int] = None):
        self.max_entries = max_entries
        self.max_bytes = default_vision_cache_bytes() if max_bytes is None else max_bytes
        self._items: OrderedDict[Hashable, mx.array] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Optional[mx.array]:
        feats = self._items.get(key)
        if feats is not None:
            self._items.move_to_end(key)
        return feats

    def put(self, key: Hashable, feats: mx.array) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        if feats.nbytes > self.max_bytes or self.max_entries == 0:
            return
        self._items[key] = feats
        self.nbytes += feats.nbytes
        while len(self._items) > self.max_entries or self.nbytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.nbytes -= dropped.nbytes

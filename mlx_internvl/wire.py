"""What the ranks of a group send each other (`distributed.Group.share`): JSON plus raw array buffers, never pickle.

A message is `MAGIC`, the header's length (8 bytes, little-endian), the JSON header, then the buffers back to back.
JSON carries None, booleans, numbers, strings and lists as themselves; everything else is a tagged object (the only
JSON objects in a header are tags): `{"t": "tuple", "v": [...]}`, `{"t": "dict", "v": [[key, value], ...]}` (any
encodable key, so int keys stay ints), `{"t": "bytes", "b": i, "n": size}`, and for numpy and MLX arrays
`{"t": "np" | "mx", "b": i, "dtype": ..., "shape": [...]}` (bfloat16 as its raw 16-bit words). Decoding builds only
those types: an unknown tag, a dtype outside `DTYPES`, or a buffer whose size does not match its shape is a
`WireError`, and a pickle (or anything else not starting with `MAGIC`) is refused before any of it is read.
"""

from __future__ import annotations

import json
import math
from typing import Any, List

import mlx.core as mx
import numpy as np

from .errors import UserError

MAGIC = b"MIVLWIR1"
DTYPES = {name: getattr(mx, name) for name in (
    "bool_", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "bfloat16",
    "float32", "float64")}
_NUMPY = {name: np.dtype(name.rstrip("_")) for name in DTYPES if name != "bfloat16"}


class WireError(UserError):
    """A message from another rank that is not one `encode` wrote (the CLI prints it as one `Error:` line)."""


def dtype_name(dtype: mx.Dtype) -> str:
    """`mx.float32` -> "float32", as `DTYPES` names it."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise WireError(f"dtype {dtype} cannot be sent between ranks (supported: {', '.join(DTYPES)})")


def dtype_named(name: Any) -> mx.Dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise WireError(f"unknown dtype {name!r} in a message from rank 0")
    return DTYPES[name]


def encode(obj: Any) -> bytes:
    buffers: List[bytes] = []
    header = json.dumps(_tree(obj, buffers), separators=(",", ":"), allow_nan=True).encode()
    return b"".join([MAGIC, len(header).to_bytes(8, "little"), header, *buffers])


def _buffer(buffers: List[bytes], data: bytes) -> int:
    buffers.append(data)
    return len(buffers) - 1


def _tree(obj: Any, buffers: List[bytes]) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)):
        return int(obj) if isinstance(obj, int) else float(obj)
    if isinstance(obj, list):
        return [_tree(v, buffers) for v in obj]
    if isinstance(obj, tuple):
        return {"t": "tuple", "v": [_tree(v, buffers) for v in obj]}
    if isinstance(obj, dict):
        return {"t": "dict", "v": [[_tree(k, buffers), _tree(v, buffers)] for k, v in obj.items()]}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        raw = bytes(obj)
        return {"t": "bytes", "b": _buffer(buffers, raw), "n": len(raw)}
    if isinstance(obj, mx.array):
        name = dtype_name(obj.dtype)
        raw = np.array(obj.view(mx.uint16) if name == "bfloat16" else obj)
        return {"t": "mx", "b": _buffer(buffers, np.ascontiguousarray(raw).tobytes()), "dtype": name,
                "shape": list(obj.shape)}
    if isinstance(obj, np.ndarray):
        name = "bool_" if obj.dtype == np.bool_ else obj.dtype.name
        if name not in _NUMPY:
            raise WireError(f"numpy dtype {obj.dtype} cannot be sent between ranks")
        return {"t": "np", "b": _buffer(buffers, np.ascontiguousarray(obj).tobytes()), "dtype": name,
                "shape": list(obj.shape)}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return _tree(obj.item(), buffers)
    raise WireError(f"a {type(obj).__name__} cannot be sent between ranks (only JSON values, tuples, dicts, bytes "
                    "and numpy/MLX arrays)")


def decode(data: bytes) -> Any:
    """The object `encode` made `data` from; a `WireError` for anything else."""
    data = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    if bytes(data[: len(MAGIC)]) != MAGIC or len(data) < len(MAGIC) + 8:
        raise WireError("a message from rank 0 is not in mlx-internvl's format (refused unread: never unpickled)")
    start = len(MAGIC) + 8
    end = start + int.from_bytes(data[len(MAGIC):start], "little")
    if end > len(data):
        raise WireError("a message from rank 0 is truncated (its header runs past its end)")
    try:
        header = json.loads(bytes(data[start:end]))
    except (ValueError, RecursionError) as e:
        raise WireError(f"a message from rank 0 has an unreadable header ({e})") from e
    reader = _Reader(data, end)
    obj = reader.build(header)
    if reader.offset != len(data):
        raise WireError("a message from rank 0 has bytes past its last buffer")
    return obj


class _Reader:
    """Rebuilds a header's tree; buffers are read in the order `encode` wrote them, each exactly once."""

    def __init__(self, data: memoryview, offset: int):
        self.data, self.offset, self.next = data, offset, 0

    def take(self, index: Any, size: int) -> bytes:
        if index != self.next or type(size) is not int or size < 0 or self.offset + size > len(self.data):
            raise WireError("a message from rank 0 has a buffer out of place or past its end")
        self.next += 1
        out = bytes(self.data[self.offset:self.offset + size])
        self.offset += size
        return out

    def build(self, node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.build(v) for v in node]
        if not isinstance(node, dict):
            raise WireError(f"a message from rank 0 has an unexpected {type(node).__name__}")
        tag = node.get("t")
        if tag == "tuple":
            return tuple(self.build(v) for v in _list(node.get("v")))
        if tag == "dict":
            pairs = [_pair(p) for p in _list(node.get("v"))]
            return {_hashable(self.build(k)): self.build(v) for k, v in pairs}
        if tag in ("np", "mx"):
            return self.array(node, tag)
        if tag == "bytes":
            return self.take(node.get("b"), node.get("n"))
        raise WireError(f"a message from rank 0 has an unknown tag {tag!r}")

    def array(self, node: dict, tag: str) -> Any:
        name, shape = node.get("dtype"), node.get("shape")
        dtype = dtype_named(name)
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise WireError(f"a message from rank 0 has a bad array shape {shape!r}")
        wide = np.dtype(np.uint16) if name == "bfloat16" else _NUMPY[name]
        raw = np.frombuffer(self.take(node.get("b"), math.prod(shape) * wide.itemsize), dtype=wide).reshape(shape)
        if tag == "np":
            if name == "bfloat16":
                raise WireError("a message from rank 0 has a bfloat16 numpy array (numpy has no bfloat16)")
            return raw.copy()
        arr = mx.array(raw)
        return arr.view(mx.bfloat16) if name == "bfloat16" else arr.astype(dtype) if arr.dtype != dtype else arr


def _list(v: Any) -> list:
    if not isinstance(v, list):
        raise WireError("a message from rank 0 has a malformed tuple or dict")
    return v


def _pair(p: Any) -> list:
    if not isinstance(p, list) or len(p) != 2:
        raise WireError("a message from rank 0 has a malformed dict entry")
    return p


def _hashable(key: Any) -> Any:
    try:
        hash(key)
    except TypeError as e:
        raise WireError(f"a message from rank 0 has an unhashable dict key {key!r}") from e
    return key

"""SHA-256 digests of a checkpoint's files, remembered between runs so that an unchanged file is not read again.

`checkpoint_digest(dir)` covers `config.json` and every `*.safetensors` file of a model directory: one changed byte
in any weight gives another digest. Each file's SHA-256 is remembered in `$MLX_INTERNVL_CACHE/digests.json`
(default `~/.cache/mlx-internvl`) under the file's resolved path (a hub snapshot's symlink resolves to its blob),
together with its size, inode, device, mtime_ns and ctime_ns. A write to the file changes its mtime and its ctime
(a program can set the mtime back, not the ctime), so a changed file is hashed again; a copied, moved or
`touch`ed one is too (a cost, never a wrong answer). When the cache file cannot be read or written (a read-only
home, a full disk) the digests are computed on every call and the log says so once; nothing fails.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

from .files import atomic_write_text
from .hub import cache_root

logger = logging.getLogger("mlx_internvl")
CACHE_FILE = "digests.json"
MAX_ENTRIES = 4096  # a few hundred checkpoints' shards; the oldest entries go first
_BLOCK = 8 << 20
_warned: set = set()


def _sha256_file(path: Path) -> str:
    """Every byte of `path` through SHA-256 (the one place that reads a whole weight file for its digest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _stamp(st: os.stat_result) -> List[int]:
    return [st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns]


def _cache_path() -> Path:
    return cache_root() / CACHE_FILE


def _read_cache(path: Path) -> Dict[str, dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        _note(path, f"cannot be read ({e})")
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, entries: Dict[str, dict]) -> None:
    if len(entries) > MAX_ENTRIES:
        entries = dict(list(entries.items())[-MAX_ENTRIES:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(entries, indent=0, sort_keys=False), "digest cache")
    except Exception as e:  # a cache we cannot keep only costs time: say so once and go on
        _note(path, f"cannot be written ({e})")


def _note(path: Path, why: str) -> None:
    if str(path) not in _warned:
        _warned.add(str(path))
        logger.warning("%s %s: weight digests will be computed on every load (set MLX_INTERNVL_CACHE to a "
                       "writable directory to keep them)", path, why)


def file_digests(files: List[Path]) -> Dict[str, str]:
    """{file name: SHA-256 of its bytes} for `files`, from the digest cache where a file is unchanged; the others
    are hashed on a few threads at once (hashlib releases the GIL), one file per thread."""
    cache_path = _cache_path()
    entries = _read_cache(cache_path)
    out, todo = {}, []
    for f in files:
        real = Path(f).resolve()
        stamp = _stamp(real.stat())
        entry = entries.get(str(real))
        if isinstance(entry, dict) and entry.get("stat") == stamp and isinstance(entry.get("sha256"), str):
            out[Path(f).name] = entry["sha256"]
        else:
            todo.append((Path(f), real, stamp))
    if not todo:
        return out
    logger.info("hashing %d file(s), %.2f GB, for the model's identity (remembered for later loads)", len(todo),
                sum(t[2][0] for t in todo) / 1e9)
    with ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1, 8)) as pool:
        digests = list(pool.map(lambda t: _sha256_file(t[1]), todo))
    for (f, real, stamp), digest in zip(todo, digests):
        out[f.name] = digest
        if _stamp(real.stat()) == stamp:  # not written to while we read it; otherwise do not remember it
            entries.pop(str(real), None)
            entries[str(real)] = {"stat": stamp, "sha256": digest}
    _write_cache(cache_path, entries)
    return out


def weight_files(directory: Path) -> List[Path]:
    """The files whose bytes decide a model directory's weights: config.json and every *.safetensors file."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    return ([directory / "config.json"] if (directory / "config.json").is_file() else []) + files


def checkpoint_digest(directory: Path) -> Optional[str]:
    """SHA-256 over the names and SHA-256s of `weight_files(directory)`; None when it holds no safetensors."""
    files = weight_files(directory)
    if not any(f.suffix == ".safetensors" for f in files):
        return None
    h = hashlib.sha256()
    for name, digest in sorted(file_digests(files).items()):
        h.update(f"{name}|{digest}\n".encode())
    return h.hexdigest()

"""What the caches hold, and removing it: the converted-model cache (ours) and huggingface-hub's download cache.

Hub models are downloaded into huggingface-hub's cache (listed with its `scan_cache_dir`, removed with its
`delete_revisions`), then converted once into `$MLX_INTERNVL_CACHE/models/<owner>--<name>/<commit>`
(default `~/.cache/mlx-internvl`). `mlx-internvl cache list|delete` is the command line for this module.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from huggingface_hub import constants, scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from .errors import UserError
from .hub import cache_root, is_repo_id


@dataclass
class Conversion:
    repo_id: str
    revision: str  # the hub commit the conversion was made from
    path: Path
    size: int  # bytes on disk

    @property
    def modified(self) -> float:
        return self.path.stat().st_mtime


def dir_size(path: Path) -> int:
    total = 0
    for p in Path(path).rglob("*"):
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def conversions(repo_id: Optional[str] = None) -> List[Conversion]:
    """Every finished conversion in the cache (half-written ones, whose names start with '.', are not listed)."""
    root = cache_root() / "models"
    if not root.is_dir():
        return []
    out = []
    for repo_dir in sorted(root.iterdir()):
        if not repo_dir.is_dir() or repo_dir.name.startswith(".") or "--" not in repo_dir.name:
            continue
        rid = repo_dir.name.replace("--", "/", 1)
        if repo_id is not None and rid != repo_id:
            continue
        for rev in sorted(repo_dir.iterdir()):
            if rev.is_dir() and not rev.name.startswith(".") and (rev / "config.json").exists():
                out.append(Conversion(rid, rev.name, rev, dir_size(rev)))
    return out


def hub_offline() -> bool:
    """huggingface-hub's own offline flag (`HF_HUB_OFFLINE`), as it reads it."""
    return bool(constants.HF_HUB_OFFLINE)


def downloads(pattern: Optional[str] = "internvl", repo_id: Optional[str] = None) -> list:
    """huggingface-hub's `scan_cache_dir()` model repos whose id contains `pattern` (case-insensitive; None: all),
    or that have a conversion here."""
    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return []
    converted = {c.repo_id for c in conversions()}
    repos = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        if repo_id is not None:
            if repo.repo_id == repo_id:
                repos.append(repo)
        elif pattern is None or pattern.lower() in repo.repo_id.lower() or repo.repo_id in converted:
            repos.append(repo)
    return sorted(repos, key=lambda r: r.repo_id)


def delete_conversions(repo_id: str, revision: Optional[str] = None) -> List[Conversion]:
    """Remove the conversions of `repo_id` (only the one made from `revision`, a commit or its prefix, if given)."""
    if not is_repo_id(repo_id):
        raise UserError(f"{repo_id!r} is not a hub repo id of the form 'owner/name'")
    chosen = [c for c in conversions(repo_id) if revision is None or c.revision.startswith(revision)]
    for c in chosen:
        shutil.rmtree(c.path)
    parent = cache_root() / "models" / repo_id.replace("/", "--")
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
    return chosen


def delete_downloads(repo_id: str, revision: Optional[str] = None):
    """Remove `repo_id`'s downloaded revisions from huggingface-hub's cache with its own `delete_revisions`.
    Returns the strategy that was executed (its `expected_freed_size_str` says how much), or None."""
    hashes = [rev.commit_hash for repo in downloads(None, repo_id) for rev in repo.revisions
              if revision is None or rev.commit_hash.startswith(revision)]
    if not hashes:
        return None
    strategy = scan_cache_dir().delete_revisions(*hashes)
    strategy.execute()
    return strategy


def age(seconds_since_epoch: float) -> str:
    delta = max(0.0, time.time() - seconds_since_epoch)
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if delta >= size:
            return f"{delta / size:.0f} {unit} ago"
    return "just now"

"""Hugging Face hub models: download once with huggingface-hub, convert once to MLX, reuse from a cache.

Downloads go to huggingface-hub's own cache (`HF_HOME`, progress bars, `HF_HUB_OFFLINE`) and fetch weights,
configs and tokenizer files only, never the checkpoint's remote code. The MLX conversion of a snapshot is written to
`$MLX_INTERNVL_CACHE/models/<owner>--<name>/<commit>` (default `~/.cache/mlx-internvl`) by
`mlx_internvl.loading.resolve_model_path`, and reused on later runs; offline, the newest conversion of the repo is
used when the hub cache no longer has the snapshot.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import UserError

DEFAULT_MODEL = "OpenGVLab/InternVL3-1B"
CACHE_ENV = "MLX_INTERNVL_CACHE"
# What a hub download fetches: weights, configs and tokenizer files, never remote code (*.py).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class HubUnavailable(UserError):
    """The repo is not in the local cache and the hub cannot be reached (or offline mode is on)."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlx-internvl").expanduser()


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "/", "~"))


def download(repo_id: str, revision: Optional[str] = None) -> Path:
    """The local snapshot directory of `repo_id` (downloaded with progress bars, or found in the hub cache)."""
    offline = constants.HF_HUB_OFFLINE  # huggingface-hub's own reading of HF_HUB_OFFLINE
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise HubUnavailable(
            f"{repo_id}: not in the local Hugging Face cache and {why} (nor is it a local directory). Connect "
            "to the internet once (unset HF_HUB_OFFLINE) to download it, or pass a local model directory."
        ) from e
    except GatedRepoError as e:
        raise UserError(f"{repo_id}: a gated repository; accept its terms on the hub and log in (hf auth login)") from e
    except RevisionNotFoundError as e:
        raise UserError(f"{repo_id}: no revision {revision!r} on the hub") from e
    except (RepositoryNotFoundError, HFValidationError) as e:
        raise UserError(f"{repo_id}: no such model repository on the Hugging Face hub") from e
    except OSError as e:
        raise UserError(f"{repo_id}: download failed ({e}). Check the network or pass a local directory.") from e


def local_or_download(path_or_repo: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local directory as it is; otherwise the hub snapshot of a repo id, as downloaded (no conversion)."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{p}: expected a model directory, got a file")
        return p
    text = str(path_or_repo)
    if not is_repo_id(text):
        raise UserError(f"{text}: no such directory, and it is not a hub repo id of the form 'owner/name'")
    return download(text, revision)


def conversion_dir(repo_id: str, snapshot: Path) -> Path:
    """Where the MLX conversion of a hub snapshot is kept (snapshot folders are named by commit)."""
    return cache_root() / "models" / repo_id.replace("/", "--") / snapshot.name


def latest_conversion(repo_id: str) -> Optional[Path]:
    """The newest complete conversion of `repo_id` in the cache, for offline use; None if there is none."""
    done = sorted((d for d in (cache_root() / "models" / repo_id.replace("/", "--")).glob("*")
                   if (d / "config.json").exists()), key=lambda d: d.stat().st_mtime)
    return done[-1] if done else None

"""`--upload-repo`: put a written directory on the Hugging Face hub with huggingface-hub's own calls.

`HfApi.create_repo(exist_ok=True)` then `HfApi.upload_folder` (one commit; huggingface-hub decides per file between
a regular and an LFS/Xet upload). The login is huggingface-hub's (`hf auth login`, `HF_TOKEN`), and so are
`HF_ENDPOINT` and `HF_HUB_OFFLINE`. Failures become one clear `UserError`; the local directory is kept either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

from .errors import UserError
from .hub import is_repo_id


def check_repo_id(repo_id: Optional[str]) -> None:
    """Refuse a malformed `--upload-repo` before any work is done."""
    if repo_id is not None and not is_repo_id(repo_id):
        raise UserError(f"--upload-repo {repo_id!r}: expected a hub repo id of the form 'owner/name'")


def upload(directory, repo_id: str, private: bool = False, message: Optional[str] = None) -> str:
    """Create `repo_id` if needed and upload `directory` to it; returns the commit URL."""
    check_repo_id(repo_id)
    directory = Path(directory)
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model",
                                 commit_message=message or f"Upload {directory.name} with mlx-internvl")
    except OfflineModeIsEnabled as e:
        raise UserError(f"cannot upload {directory} to {repo_id}: HF_HUB_OFFLINE is set. Unset it and run again; "
                        f"the directory is kept.") from e
    except LocalTokenNotFoundError as e:
        raise UserError(f"cannot upload {directory} to {repo_id}: not logged in to the hub. Log in with "
                        "`hf auth login` or set HF_TOKEN; the directory is kept.") from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = " Log in with `hf auth login` or set HF_TOKEN." if status in (401, 403) else ""
        raise UserError(f"uploading {directory} to {repo_id} failed ({status}: {str(e).splitlines()[0]}).{hint} "
                        "The directory is kept; run the upload again.") from e
    except OSError as e:
        raise UserError(f"uploading {directory} to {repo_id} failed ({e}). Check the network; the directory is "
                        "kept.") from e
    return str(getattr(info, "commit_url", info))

"""Files on disk, written so that a reader never sees half of one: the helpers every writer here shares.

- `staged_output`: a whole directory built under a temporary sibling name and renamed into place when complete
  (convert, export, fuse, PEFT export, training checkpoints); `atomic_write` does the same for one file.
- `save_weights`: sharded safetensors (`model-0000k-of-0000n.safetensors` + index), one tensor evaluated at a time.
- `read_json`, `save_json`, and which tokenizer/processor files travel with a model (`copy_model_files`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Optional

import mlx.core as mx
from tqdm import tqdm

from .errors import CheckpointError, UserError

SHARD_BYTES = 4 << 30
# Files that describe the tokenizer and generation: they fit every layout of the same checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")
# Chat-template and image-processor files, which are written for one layout (original or -hf).
LAYOUT_FILES = ("chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json")


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e


def check_new_output(out: Path, force: bool) -> None:
    """Refuse to replace an existing `out` unless `force` is set (every command that writes a directory asks)."""
    if Path(out).exists() and not force:
        raise UserError(f"{out} already exists. Delete it or pass --force to replace it.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `out`, on any error it is removed.

    With `force`, an existing `out` is moved aside only after the new directory is complete, and is put back if
    the final rename fails, so a failed run never leaves a half-written or missing output.
    """
    out = Path(out)
    check_new_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; give the result normal directory permissions
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old is not None:
                old.rename(out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` and move the result over `path` in one rename, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the result normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_json(path: Path, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)

    atomic_write(path, write)


def save_safetensors(path: Path, tensors: Dict[str, mx.array], metadata: Optional[dict] = None) -> None:
    atomic_write(path, lambda tmp: mx.save_safetensors(tmp, tensors, metadata=metadata or {}))


def _shards(weights: Dict[str, mx.array]) -> list:
    """Sorted keys cut into groups of at most `SHARD_BYTES`."""
    shards, current, size = [], [], 0
    for key in sorted(weights):
        nbytes = weights[key].nbytes
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    return shards + [current] if current else shards


def save_weights(weights: dict, out: Path, metadata: Optional[dict] = None, desc: str = "writing") -> None:
    """Write `weights` as `model-0000k-of-0000n.safetensors` shards of at most `SHARD_BYTES` (+ index).

    Tensors are evaluated one at a time and each shard is released once written, so peak memory is about one
    output shard plus one source tensor, not the model. `weights` is emptied as it goes.
    """
    metadata = {"format": "mlx"} if metadata is None else metadata
    shards = _shards(weights)
    n = len(shards)
    weight_map, total = {}, 0
    with tqdm(total=sum(len(keys) for keys in shards), desc=desc, unit="tensor", disable=None, leave=False) as bar:
        for i, keys in enumerate(shards):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            shard = {}
            for key in keys:
                arr = weights.pop(key)
                mx.eval(arr)
                shard[key] = arr
                bar.update()
            mx.save_safetensors(str(out / name), shard, metadata=metadata)
            total += sum(v.nbytes for v in shard.values())
            weight_map.update({k: name for k in keys})
            del shard, arr
            mx.clear_cache()
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def copy_model_files(src: Optional[Path], dst: Path, names: Iterable[str] = TOKENIZER_FILES + LAYOUT_FILES,
                     remote_code: bool = False) -> None:
    """Copy the files among `names` that `src` has; with `remote_code`, also its `*.py` files, as plain files that
    are never imported here (so an original-layout export loads with `trust_remote_code=True` again)."""
    if src is None:
        return
    for name in names:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    if remote_code:
        for f in sorted(src.glob("*.py")):
            shutil.copyfile(f, dst / f.name)

"""Files on disk, written so that a reader never sees half of one: the helpers every writer here shares.

- `staged_output`: a whole directory built under a temporary sibling name (`.NAME.partial-PID-*`) and renamed into
  place when complete (convert, export, fuse, PEFT export, training checkpoints); `atomic_write` does the same for
  one file (`.NAME.partial-PID-*.EXT`). `sweep_stale`, the one sweeper every writer calls, removes the staging
  entries of runs that were killed (their pid is gone), with a note, and puts back an old output a kill left moved
  aside (`.NAME.old-PID-*`); those of a run still going are left alone.
- `output_errors`: a failed write (no space, read-only file system, no permission, a parent that is a file, and
  MLX's own write failures) becomes one `UserError` naming the path and the cause; `check_writable_dir` says so
  before any work is done.
- `save_weights`: sharded safetensors (`model-0000k-of-0000n.safetensors` + index), one tensor evaluated at a time.
- `read_json`, `save_json`, and which tokenizer/processor files travel with a model (`copy_model_files`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional

import mlx.core as mx
from tqdm import tqdm

from .errors import CheckpointError, UserError

logger = logging.getLogger("mlx_internvl")

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
    """Refuse to replace an existing `out` unless `force` is set (every command that writes a directory asks), and
    refuse, before any work, an `out` that cannot be written (a parent is a file, a read-only file system)."""
    sweep_stale(Path(out))  # before any refusal, so that a re-run without --force clears a killed run's leftovers
    if Path(out).exists() and not force:
        raise UserError(f"{out} already exists. Delete it or pass --force to replace it.")
    check_writable_dir(Path(out))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_CAUSES = {
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "permission denied; choose a directory you can write to",
    errno.EPERM: "permission denied; choose a directory you can write to",
    errno.ENOTDIR: "a parent of it is a file, not a directory; choose another path",
    errno.EEXIST: "a file is in the way (a parent of it is a file, not a directory); choose another path",
    errno.EISDIR: "it is a directory; give a file name",
    errno.ENAMETOOLONG: "the name is too long",
}


def _guess_cause(path: Path) -> str:
    """Why MLX (which raises RuntimeError without an errno) could not write under `path`."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return _CAUSES[errno.ENOTDIR]
    try:
        st = os.statvfs(probe)
        if st.f_flag & os.ST_RDONLY:
            return _CAUSES[errno.EROFS]
        if st.f_bavail * st.f_frsize < (1 << 20):
            return _CAUSES[errno.ENOSPC]
    except OSError:
        pass
    if not os.access(probe, os.W_OK):
        return _CAUSES[errno.EACCES]
    return "the write failed"


def _is_write_failure(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and bool(re.search(r"Unable to write|Failed to open file|\[write\]", str(e)))


@contextmanager
def output_errors(path, what: str = "output") -> Iterator[None]:
    """Turn a failed write under `path` into a `UserError` naming the path and the cause."""
    try:
        yield
    except UserError:
        raise
    except OSError as e:
        cause = _CAUSES.get(e.errno) or (e.strerror or str(e))
        where = f"{e.filename}: " if e.filename and str(e.filename) != str(path) else ""
        raise UserError(f"cannot write the {what} {path}: {where}{cause}. Nothing was written; any earlier "
                        "output is unchanged.") from e
    except RuntimeError as e:
        if not _is_write_failure(e):
            raise
        raise UserError(f"cannot write the {what} {path}: {_guess_cause(Path(path))} ({e}). Nothing was written; "
                        "any earlier output is unchanged.") from e


def check_writable_dir(path, what: str = "output directory") -> None:
    """Fail early, before hours of work, when `path` cannot become a directory we write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"the {what} {path} is a file; give a directory")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot write the {what} {path}: {probe}: {_CAUSES[errno.ENOTDIR]}")
    cause = _guess_cause(probe)
    if cause in (_CAUSES[errno.EROFS], _CAUSES[errno.EACCES]):
        raise UserError(f"cannot write the {what} {path}: {cause}")


def atomic_write(path, write, what: str = "file") -> None:
    """Call `write(tmp_path)` and move the result over `path` in one rename, so readers never see half a file."""
    path = Path(path)
    with output_errors(path, what):
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        sweep_stale(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-{os.getpid()}-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the result normal permissions
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def atomic_write_text(path, text: str, what: str = "file") -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write, what)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# `.NAME.partial-PID-xxxx[.ext]` (a staging folder or file) and `.NAME.old-PID-xxxx` (an output moved aside while
# being replaced): every writer here names its temporaries so, and `sweep_stale` is the one place that reads them.
# The 8 characters after the pid are tempfile's random part: a user's `.notes.old-2020-draft` is not ours.
_STAGED = re.compile(r"\.(?P<base>.+)\.(?P<kind>partial|old)-(?:(?P<pid>\d+)-)?[a-z0-9_]{8}(?:\..*)?")


def _staged(name: str):
    """(output name, kind, pid) of a staging entry, pid 0 for one written without a pid; None for other names."""
    m = _STAGED.fullmatch(name)
    return None if m is None else (m["base"], m["kind"], int(m["pid"]) if m["pid"] else 0)


def sweep_stale(out: Path, every: bool = False) -> List[Path]:
    """Clear the staging entries (`.partial-*` folders and files, `.old-*` copies) that killed runs left beside
    `out`, or with `every`, in the directory `out`: those of every output there, so that any later run into the
    directory clears what a kill left. A kill that left the old output moved aside and the new one not in place
    gets the old one back. Entries whose pid is alive (a run still going, this one included) are left alone; a
    name without a pid (an older version's) is cleared only beside the `out` it names."""
    out = Path(out)
    parent = out if every else out.parent
    if not parent.is_dir():
        return []
    removed = []
    entries = sorted((e, p) for p in parent.iterdir()
                     if (e := _staged(p.name)) and (e[2] or (not every and e[0] == out.name)))
    for (base, kind, pid), p in sorted(entries, key=lambda x: x[0][1] != "old"):  # restore before removing
        if (pid and _pid_alive(pid)) or (not pid and every):
            continue
        target = parent / base
        if kind == "old" and not target.exists():
            p.rename(target)  # killed after moving the old output aside: it is still the output
            logger.warning("%s: restored the previous output that an interrupted run had moved aside", target)
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        logger.warning("removed %d staging folder(s) left by an interrupted earlier run: %s", len(removed),
                       ", ".join(p.name for p in removed))
    return removed


@contextmanager
def staged_output(out: Path, force: bool, what: str = "output") -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `out`, on any error it is removed.

    With `force`, an existing `out` is moved aside only after the new directory is complete, and is put back if
    the final rename fails, so a failed run never leaves a half-written or missing output.
    """
    out = Path(out)
    with output_errors(out, what):
        check_new_output(out, force)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; give the result normal directory permissions
        try:
            yield tmp
            old = None
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
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

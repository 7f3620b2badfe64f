"""Writing what the user gets: whole or not at all, and a clear error when the disk refuses.

- `atomic_write(path, write)`: a file is written under a temporary sibling name and renamed over `path`, so a
  reader never sees half a file and a failed write leaves the old one.
- `staged_output(out, force)`: a directory is filled under `.NAME.partial-PID-*` and renamed into place when
  complete; a replaced directory is moved aside as `.NAME.old-PID-*` until the new one is in.
- `sweep_stale(out)`: staging folders whose process is gone (a killed run) are removed on the next run, with a
  note; if a kill fell between moving the old output aside and renaming the new one in, the old output is put back.
- `output_errors(path)`: OS errors while writing (no space, read-only file system, no permission, a parent that
  is a file) and MLX's own write failures become one `UserError` that names the path and the cause.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

from .errors import UserError

logger = logging.getLogger("mlx_internvl")

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


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the result normal permissions
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


def _owner(name: str, base: str, kind: str):
    """The pid in `.BASE.KIND-PID-xxxx`, None for a name without one (written by an older version)."""
    m = re.fullmatch(re.escape(f".{base}.{kind}-") + r"(?:(\d+)-)?.*", name)
    return None if m is None else (int(m.group(1)) if m.group(1) else 0)


def sweep_stale(out: Path) -> List[Path]:
    """Remove `.OUT.partial-*` / `.OUT.old-*` siblings of `out` left by runs that were killed; restore an old
    output a kill left moved aside. Staging folders of a run still going (its pid alive) are left alone."""
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return []
    removed = []
    for kind in ("old", "partial"):
        for p in sorted(parent.glob(f".{out.name}.{kind}-*")):
            pid = _owner(p.name, out.name, kind)
            if pid is None or (pid and _pid_alive(pid)):
                continue
            if kind == "old" and not out.exists():
                p.rename(out)  # killed after moving the old output aside: it is still the output
                logger.warning("%s: restored the previous output that an interrupted run had moved aside", out)
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
        if out.exists() and not force:
            raise UserError(f"{out} already exists. Delete it or pass --force to replace it.")
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp creates 0700; give the result normal directory permissions
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

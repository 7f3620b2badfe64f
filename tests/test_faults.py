"""Faults while writing: a SIGKILL in the middle of convert, export, fuse and a LoRA checkpoint, then a re-run; a
full and a read-only disk during each. Nothing half-written is left, the re-run gives the same bytes as an
uninterrupted run, a refused write is one `Error:` line and the previous output is untouched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from builders import Case
from lora_fixtures import color_task
from mlx_internvl.cli.main import main
from mlx_internvl.errors import UserError
from mlx_internvl.files import save_json, staged_output, sweep_stale

TESTS = Path(__file__).parent
CASE = Case("faults")

# Runs a CLI command with one library function wrapped so that its N-th call completes and then the process is
# SIGKILLed: no exception handler, no `finally`, no atexit runs, exactly like a crash or `kill -9`.
KILLER = """
import importlib, os, signal, sys
module, attr, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
mod = importlib.import_module(module)
real, calls = getattr(mod, attr), [0]
def wrapped(*a, **k):
    out = real(*a, **k)
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
setattr(mod, attr, wrapped)
from mlx_internvl.cli.main import main
main(sys.argv[4:])
"""


def run_cli(*args, kill=None):
    """`mlx-internvl ARGS` in a fresh process; `kill=(module, function, n)` kills it after that call."""
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    if kill is None:
        cmd = [sys.executable, "-c", "from mlx_internvl.cli.main import main; import sys; main(sys.argv[1:])"]
    else:
        cmd = [sys.executable, "-c", KILLER, kill[0], kill[1], str(kill[2])]
    return subprocess.run(cmd + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=300)


def digest(path: Path) -> dict:
    """{relative file: sha256} of everything under `path`."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def same_output(a: Path, b: Path) -> bool:
    """Two output directories hold the same files, byte for byte, except that the model card (README.md) names
    the directory it was written to in its command line."""
    da, db = digest(a), digest(b)
    card_a, card_b = (d.pop("README.md", None) for d in (da, db))
    return da == db and (card_a is None) == (card_b is None)


def hidden(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def adapters_equal(a: Path, b: Path) -> bool:
    x, y = mx.load(str(a / "adapters.safetensors")), mx.load(str(b / "adapters.safetensors"))
    return sorted(x) == sorted(y) and all(np.array_equal(np.array(x[k]), np.array(y[k])) for k in x)


@pytest.fixture(scope="module")
def setup(build_case, tmp_path_factory):
    """The checkpoint, its conversion, a 3-step LoRA run, and the uninterrupted outputs to compare with."""
    built = build_case(CASE)
    root = tmp_path_factory.mktemp("faults")
    color_task(root, 8, "train", seed=3)
    mlx_dir = root / "mlx"
    assert main_ok("convert", built.hf_dir, mlx_dir)
    ad = root / "adapters"
    assert main_ok(*lora_args(mlx_dir, root, ad))
    assert main_ok("export", mlx_dir, root / "export")
    assert main_ok("fuse", "--model", mlx_dir, "--adapter-path", ad, "--out", root / "fused")
    return built, root, mlx_dir, ad


def main_ok(*args) -> bool:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code in (0, None)
    return True


def lora_args(model, root, out, iters=3, resume=False):
    args = ["lora", "--model", model, "--data", root / "train.jsonl", "--adapter-path", out, "--iters", iters,
            "--batch-size", 2, "--save-every", 1, "--keep-checkpoints", 5, "--rank", 2, "--lr", 1e-3]
    return args + (["--resume"] if resume else [])


# --- SIGKILL, then a re-run -------------------------------------------------------------------------------------

def test_sigkill_during_convert_then_rerun(setup, tmp_path):
    built, _, mlx_dir, _ = setup
    out = tmp_path / "out"
    r = run_cli("convert", built.hf_dir, out, kill=("mlx_internvl.weights", "save_config", 1))
    assert r.returncode == -9, r.stderr[-1500:]
    assert not out.exists() and hidden(tmp_path) and hidden(tmp_path)[0].startswith(".out.partial-")
    r = run_cli("convert", built.hf_dir, out)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "removed 1 staging folder(s) left by an interrupted earlier run" in r.stderr
    assert hidden(tmp_path) == []
    assert same_output(out, mlx_dir)


def test_sigkill_during_export_then_rerun(setup, tmp_path):
    _, root, mlx_dir, _ = setup
    out = tmp_path / "out"
    r = run_cli("export", mlx_dir, out, kill=("mlx_internvl.convert.export", "save_weights", 1))
    assert r.returncode == -9, r.stderr[-1500:]
    assert not out.exists() and hidden(tmp_path)
    assert main_ok("export", mlx_dir, out)
    assert hidden(tmp_path) == []
    assert same_output(out, root / "export")


def test_sigkill_during_fuse_then_rerun(setup, tmp_path):
    _, root, mlx_dir, ad = setup
    out = tmp_path / "out"
    # Killed while replacing an existing output: the old one must survive the kill.
    shutil.copytree(mlx_dir, out)
    before = digest(out)
    r = run_cli("fuse", "--model", mlx_dir, "--adapter-path", ad, "--out", out, "--force",
                kill=("mlx_internvl.weights", "save_weights", 1))
    assert r.returncode == -9, r.stderr[-1500:]
    assert digest(out) == before and hidden(tmp_path)
    assert main_ok("fuse", "--model", mlx_dir, "--adapter-path", ad, "--out", out, "--force")
    assert hidden(tmp_path) == []
    assert same_output(out, root / "fused")


def test_sigkill_during_a_lora_checkpoint_write_then_resume(setup, tmp_path):
    _, root, mlx_dir, whole = setup
    killed = tmp_path / "killed"
    # Each checkpoint hashes its 3 files into manifest.json; the 5th hash is inside step 2's checkpoint.
    r = run_cli(*lora_args(mlx_dir, root, killed), kill=("mlx_internvl.lora.state", "_sha256", 5))
    assert r.returncode == -9, r.stderr[-1500:]
    assert [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]
    r = run_cli(*lora_args(mlx_dir, root, killed, resume=True))
    assert r.returncode == 0, r.stderr[-1500:]
    assert "Resuming from" in r.stdout and "step-0000001" in r.stdout
    assert hidden(killed / "checkpoints") == [] and hidden(killed) == []
    assert adapters_equal(whole, killed)


def test_resume_passes_over_a_corrupt_newest_checkpoint(setup, tmp_path, capsys):
    _, root, mlx_dir, whole = setup
    run = tmp_path / "run"
    assert main_ok(*lora_args(mlx_dir, root, run, iters=2))
    newest = run / "checkpoints" / "step-0000002" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as by a full disk
    capsys.readouterr()
    assert main_ok(*lora_args(mlx_dir, root, run, resume=True))
    text = capsys.readouterr().out
    assert "step-0000002 (optimizer.safetensors is" in text and "Using step-0000001" in text
    assert adapters_equal(whole, run)


def test_sweep_puts_back_an_output_a_kill_left_moved_aside(tmp_path):
    old = tmp_path / ".model.old-999999999-abc_1234"  # a pid that cannot exist
    old.mkdir()
    (old / "config.json").write_text("{}")
    (tmp_path / ".model.partial-999999999-def_1234").mkdir()
    sweep_stale(tmp_path / "model")
    assert (tmp_path / "model" / "config.json").read_text() == "{}" and hidden(tmp_path) == []


def test_staging_folders_of_a_live_run_are_left_alone(tmp_path):
    live = tmp_path / f".model.partial-{os.getppid()}-abc_1234"
    live.mkdir()
    mine = tmp_path / ".notes.old-2020-draft"  # a user's file, not a name tempfile gives
    mine.write_text("keep")
    sweep_stale(tmp_path / "model")
    assert live.exists() and mine.read_text() == "keep"


DEAD = 999999999  # above any pid_max: a run that is gone


@contextmanager
def live_pid():
    """The pid of a process that is running (a sleeping child), for staging entries of a run still going."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


def plant(parent: Path, name: str) -> Path:
    (parent / name).mkdir(parents=True)
    (parent / name / "config.json").write_text(name)
    return parent / name


def test_sigkill_during_convert_force_then_a_rerun_without_force(setup, tmp_path):
    built, _, mlx_dir, _ = setup
    out = tmp_path / "out"
    shutil.copytree(mlx_dir, out)
    r = run_cli("convert", built.hf_dir, out, "--force", kill=("mlx_internvl.weights", "save_config", 1))
    assert r.returncode == -9 and hidden(tmp_path)[0].startswith(".out.partial-")
    r = run_cli("convert", built.hf_dir, out)  # refused (out exists), and the killed run's folder is gone
    assert r.returncode == 1 and "already exists" in r.stderr
    assert "removed 1 staging folder(s) left by an interrupted earlier run: .out.partial-" in r.stderr
    assert hidden(tmp_path) == []


# Each writer below meets: a live run's staging folder (kept), a dead run's (removed), and an output a dead run had
# moved aside while replacing it and never put back (restored). The same rules beside a convert output and among a
# LoRA run's checkpoints: both go through `files.sweep_stale`.

def test_convert_sweeps_by_the_pid_rules(setup, tmp_path):
    built = setup[0]
    with live_pid() as pid:
        live = plant(tmp_path, f".out.partial-{pid}-aaaaaaaa")
        dead = plant(tmp_path, f".out.partial-{DEAD}-bbbbbbbb")
        other = plant(tmp_path, f".other.partial-{DEAD}-dddddddd")  # a killed run into another output here
        plant(tmp_path, f".out.old-{DEAD}-cccccccc")
        r = run_cli("convert", built.hf_dir, tmp_path / "out")
        assert r.returncode == 1 and "already exists" in r.stderr  # the old output is back in place
        assert (tmp_path / "out" / "config.json").read_text() == f".out.old-{DEAD}-cccccccc"
        assert live.exists() and not dead.exists() and not other.exists() and hidden(tmp_path) == [live.name]


def test_lora_sweeps_by_the_pid_rules(setup, tmp_path):
    _, root, mlx_dir, ad = setup
    run = tmp_path / "run"
    shutil.copytree(ad, run)
    ckpt = run / "checkpoints"
    shutil.move(ckpt / "step-0000003", ckpt / f".step-0000003.old-{DEAD}-cccccccc")
    with live_pid() as pid:
        live = plant(ckpt, f".step-0000004.partial-{pid}-aaaaaaaa")
        dead = plant(ckpt, f".step-0000002.partial-{DEAD}-bbbbbbbb")
        assert main_ok(*lora_args(mlx_dir, root, run, iters=3, resume=True))
        assert live.exists() and not dead.exists() and hidden(ckpt) == [live.name]
        assert (ckpt / "step-0000003" / "manifest.json").is_file()


def test_an_atomic_write_sweeps_the_temporary_file_of_a_killed_write(tmp_path):
    (tmp_path / f".config.json.partial-{DEAD}-x1234567.json").write_text("{")
    save_json(tmp_path / "config.json", {"a": 1})
    assert hidden(tmp_path) == [] and json.loads((tmp_path / "config.json").read_text()) == {"a": 1}


# --- full and read-only disks -----------------------------------------------------------------------------------

@contextmanager
def small_disk(path: Path):
    """A tmpfs at `path` (root only); yields a function that shrinks it to what it holds plus `spare` bytes or
    makes it read-only."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs a tmpfs mount (root)")

    def limit(spare_kb=None, read_only=False):
        used_kb = int(subprocess.run(["df", "-k", "--output=used", str(path)], capture_output=True,
                                     text=True).stdout.split()[-1])
        opts = "remount,ro" if read_only else f"remount,size={used_kb + spare_kb}k"
        subprocess.run(["mount", "-o", opts, str(path)], check=True)

    try:
        yield limit
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def refused(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, err
    return lines[0]


OPS = {
    "convert": lambda s, out: ["convert", s[0].hf_dir, out, "--force"],
    "export": lambda s, out: ["export", s[2], out, "--force"],
    "fuse": lambda s, out: ["fuse", "--model", s[2], "--adapter-path", s[3], "--out", out, "--force"],
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_full_or_read_only_disk(setup, tmp_path, capsys, op, fault):
    with small_disk(tmp_path / "disk") as limit:
        out = tmp_path / "disk" / "out"
        assert main_ok(*OPS[op](setup, out))
        before = digest(out)
        limit(spare_kb=64, read_only=fault == "read-only")
        line = refused(capsys, *OPS[op](setup, out))
        assert str(out) in line
        assert ("no space left" in line) if fault == "full" else ("read-only" in line)
        assert digest(out) == before
        assert hidden(out.parent) == []


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_full_or_read_only_disk_during_lora(setup, tmp_path, capsys, fault):
    _, root, mlx_dir, _ = setup
    with small_disk(tmp_path / "disk") as limit:
        out = tmp_path / "disk" / "ad"
        assert main_ok(*lora_args(mlx_dir, root, out, iters=1))
        before = digest(out)
        limit(spare_kb=16, read_only=fault == "read-only")
        line = refused(capsys, *lora_args(mlx_dir, root, out, iters=3, resume=True))
        assert ("no space left" in line) if fault == "full" else ("read-only" in line)
        if fault == "read-only":
            assert digest(out) == before
        else:  # the failed checkpoint left nothing; step 1's files are as they were
            after = digest(out)
            assert {k: v for k, v in after.items() if k != "loss.csv"} == \
                {k: v for k, v in before.items() if k != "loss.csv"}
            assert hidden(out / "checkpoints") == []


def test_output_whose_parent_is_a_file(setup, tmp_path, capsys):
    built = setup[0]
    (tmp_path / "f").write_text("x")
    line = refused(capsys, "convert", built.hf_dir, tmp_path / "f" / "out")
    assert "is a file" in line or "a file is in the way" in line


def test_staged_output_maps_a_full_disk_to_a_user_error(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("old")
    with pytest.raises(UserError, match="no space left on the device.*earlier output is unchanged"):
        with staged_output(tmp_path / "out", force=True):
            raise OSError(28, "No space left on device")
    assert (tmp_path / "out" / "keep").read_text() == "old" and hidden(tmp_path) == []
    with pytest.raises(UserError, match="cannot write"):
        with staged_output(tmp_path / "out", force=True):
            raise RuntimeError("[write] Unable to write 10 bytes to file.")
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == '["out"]'

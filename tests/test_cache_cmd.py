"""`mlx-internvl cache list|delete`: the converted-model cache and huggingface-hub's download cache (listed by its
`scan_cache_dir`, deleted by its `delete_revisions`), in a subprocess with both caches in a temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builders import Case

ROOT = Path(__file__).parent.parent
REPO = "OpenGVLab/InternVL3-1B"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_download(src: Path, hub: Path, repo_id: str, commit: str) -> Path:
    """`src` as huggingface-hub stores a download: blobs, a ref, and a snapshot of symlinks."""
    owner, name = repo_id.split("/")
    repo = hub / f"models--{owner}--{name}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"{i:040d}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


def run(args, env, stdin=None):
    full = dict(os.environ, **env, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "mlx_internvl", *map(str, args)], capture_output=True, text=True,
                          env=full, timeout=180, cwd=ROOT, input=stdin)


@pytest.mark.slow
def test_cache_list_and_delete(build_case, tmp_path):
    built = build_case(Case("cache_tiny"))
    hub, ours = tmp_path / "hub", tmp_path / "mlx-cache"
    fake_download(built.original_dir, hub, REPO, COMMIT)
    fake_download(built.hf_dir, hub, "someone/other-model", "f" * 40)
    env = {"HF_HUB_CACHE": str(hub), "MLX_INTERNVL_CACHE": str(ours), "HF_HUB_OFFLINE": "1"}
    # A hub id is resolved from the download cache and converted once into ours.
    r = run(["generate", "--model", REPO, "--prompt", "hi", "-m", 2], env)
    assert r.returncode == 0, r.stderr
    conversion = ours / "models" / "OpenGVLab--InternVL3-1B" / COMMIT
    assert (conversion / "config.json").exists()

    r = run(["cache", "list"], env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    row = next(line for line in lines if line.startswith(REPO) and COMMIT[:12] in line)
    size = sum(p.stat().st_size for p in conversion.rglob("*") if p.is_file())
    assert f"{size / 1000:.1f} KB" in row or f"{size / 1e6:.1f} MB" in row
    assert "HF_HUB_OFFLINE is on" in r.stdout
    downloads = lines[lines.index(next(line for line in lines if line.startswith("Hugging Face downloads"))):]
    assert any(line.startswith(REPO) for line in downloads)
    assert not any(line.startswith("someone/other-model") for line in downloads)  # not InternVL, not converted
    everything = run(["cache", "list", "--all"], env).stdout.splitlines()
    assert any(line.startswith("someone/other-model") for line in everything)

    # Without --yes it asks; "n" keeps everything.
    r = run(["cache", "delete", REPO], env, stdin="n\n")
    assert r.returncode != 0 and conversion.exists()
    r = run(["cache", "delete", REPO, "--downloads", "--yes"], env)
    assert r.returncode == 0, r.stderr
    assert "Deleted 1 conversion(s)" in r.stdout and "1 download revision(s)" in r.stdout
    assert not conversion.exists() and not (hub / "models--OpenGVLab--InternVL3-1B").exists()
    assert (hub / "models--someone--other-model").exists()
    r = run(["cache", "delete", REPO, "--yes"], env)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"Error: nothing cached for {REPO}; see `mlx-internvl cache list`")


def test_mlx_community_repo_is_read_without_converting(tmp_path):
    """A hub id whose download is an mlx-vlm checkpoint is loaded from the download; nothing goes into our cache."""
    fixture = Path(__file__).parent / "fixtures" / "mlx_vlm" / "internvl_chat-4bit"
    hub, ours = tmp_path / "hub", tmp_path / "mlx-cache"
    fake_download(fixture, hub, "mlx-community/InternVL3-1B-4bit", "c" * 40)
    env = {"HF_HUB_CACHE": str(hub), "MLX_INTERNVL_CACHE": str(ours), "HF_HUB_OFFLINE": "1"}
    r = run(["generate", "--model", "mlx-community/InternVL3-1B-4bit", "--prompt", "hi", "-m", 2, "--verbose"], env)
    assert r.returncode == 0, r.stderr
    assert "read as mlx-vlm internvl_chat layout" in r.stderr and "4-bit affine, group size 64" in r.stderr
    assert not (ours / "models").exists()

"""Model cards written by convert / fuse / export, and `--upload-repo` up to the hub call: huggingface-hub's own
`create_repo` + `upload_folder`, against a stand-in hub on 127.0.0.1 (no hub is reachable here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hub_stand_in import HubStandIn

from builders import Case
from mlx_internvl.cli.main import main as cli_main
from mlx_internvl.model_card import front_matter

ROOT = Path(__file__).parent.parent
CASE = Case("publish_tiny")


def cli_run(*args) -> None:
    try:
        cli_main([str(a) for a in args])
    except SystemExit as e:
        assert e.code in (0, None), f"mlx-internvl {' '.join(map(str, args))} exited with {e.code}"


def hub_cache_copy(src: Path, root: Path, repo_id: str) -> Path:
    """`src` laid out as huggingface-hub's cache holds a snapshot of `repo_id`."""
    owner, name = repo_id.split("/")
    snap = root / f"models--{owner}--{name}" / "snapshots" / ("ab" * 20)
    shutil.copytree(src, snap)
    return snap


def card(path: Path) -> tuple:
    text = (path / "README.md").read_text()
    return front_matter(path), text


def test_convert_writes_a_model_card(build_case, tmp_path):
    built = build_case(CASE)
    snap = hub_cache_copy(built.original_dir, tmp_path / "hub", "OpenGVLab/InternVL3-1B")
    cli_run("convert", snap, tmp_path / "q4", "-q", "--q-bits", 4, "--q-group-size", 32)
    meta, text = card(tmp_path / "q4")
    assert meta["library_name"] == "mlx" and meta["pipeline_tag"] == "image-text-to-text"
    assert {"mlx", "internvl"} <= set(meta["tags"])
    assert meta["base_model"] == "OpenGVLab/InternVL3-1B" and meta["base_model_relation"] == "quantized"
    assert "[OpenGVLab/InternVL3-1B](https://huggingface.co/OpenGVLab/InternVL3-1B)" in text
    assert f"mlx-internvl convert {snap} {tmp_path / 'q4'} -q --q-bits 4 --q-group-size 32" in text
    assert "4 bits (affine, group size 32)" in text
    assert 'mlx-internvl generate --model q4 --image image.jpg --prompt "Describe this image."' in text
    # a local directory that is no hub snapshot: no base_model claimed
    cli_run("convert", built.original_dir, tmp_path / "plain")
    meta, text = card(tmp_path / "plain")
    assert "base_model" not in meta and "from a local checkpoint" in text


def test_fuse_and_export_cards(build_case, tmp_path):
    from lora_fixtures import color_task

    built = build_case(CASE)
    snap = hub_cache_copy(built.hf_dir, tmp_path / "hub", "OpenGVLab/InternVL3-1B-hf")
    cli_run("convert", snap, tmp_path / "mlx")
    color_task(tmp_path / "data", 4, "train", seed=3)
    cli_run("lora", "--model", tmp_path / "mlx", "--data", tmp_path / "data" / "train.jsonl", "--adapter-path",
            tmp_path / "ad", "--iters", 2, "--batch-size", 2)
    cli_run("fuse", "--model", tmp_path / "mlx", "--adapter-path", tmp_path / "ad", "--save-path", tmp_path / "fused")
    meta, text = card(tmp_path / "fused")
    # base_model is carried over from the converted model's own card
    assert meta["library_name"] == "mlx" and meta["base_model"] == "OpenGVLab/InternVL3-1B-hf"
    assert meta["base_model_relation"] == "finetune" and {"mlx", "internvl"} <= set(meta["tags"])
    assert f"mlx-internvl fuse --model {tmp_path / 'mlx'} --adapter-path {tmp_path / 'ad'}" in text
    cli_run("export", tmp_path / "fused", tmp_path / "hf", "--layout", "hf")
    meta, text = card(tmp_path / "hf")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert meta["base_model"] == "OpenGVLab/InternVL3-1B-hf" and "internvl" in meta["tags"]
    assert "InternVLForConditionalGeneration.from_pretrained" in text
    assert f"mlx-internvl export {tmp_path / 'fused'} {tmp_path / 'hf'} --layout hf" in text


def run_cli_subprocess(args, env, timeout=240):
    full = dict(os.environ, **env, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "mlx_internvl", *map(str, args)], capture_output=True, text=True,
                          env=full, timeout=timeout, cwd=ROOT)


def test_upload_repo_calls_the_hub_api(build_case, tmp_path):
    built = build_case(CASE)
    out = tmp_path / "up"
    with HubStandIn() as hub:
        r = run_cli_subprocess(["convert", built.original_dir, out, "--upload-repo", "me/tiny-internvl-mlx"],
                               hub.env())
    assert r.returncode == 0, r.stderr
    assert "uploaded it to me/tiny-internvl-mlx" in r.stdout
    (created,) = hub.created
    assert (created["name"], created["organization"]) == ("tiny-internvl-mlx", "me")
    assert ("POST", "/api/models/me/tiny-internvl-mlx/preupload/main") in hub.requests
    (files,) = hub.commits
    local = sorted(p.name for p in out.iterdir())
    assert sorted(files) == local and "README.md" in files and "model.safetensors" in files
    for name, data in files.items():
        assert data == (out / name).read_bytes(), name
    # the card names the repo it was uploaded to
    assert b"mlx-internvl generate --model me/tiny-internvl-mlx" in files["README.md"]


def test_upload_failure_is_one_error_and_keeps_the_directory(build_case, tmp_path):
    built = build_case(CASE)
    out = tmp_path / "kept"
    with HubStandIn(fail_create=401) as hub:
        r = run_cli_subprocess(["convert", built.original_dir, out, "--upload-repo", "me/denied"], hub.env())
    assert r.returncode == 1 and "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("Error: uploading") and "401" in err and "hf auth login" in err
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    assert hub.commits == []


def test_bad_upload_repo_is_refused_before_any_work(build_case, tmp_path, capsys):
    built = build_case(CASE)
    with pytest.raises(SystemExit) as e:
        cli_main(["convert", str(built.original_dir), str(tmp_path / "never"), "--upload-repo", "no-owner"])
    assert e.value.code == 1
    assert "--upload-repo 'no-owner': expected a hub repo id" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()

"""`mlx-internvl generate` and `mlx-internvl chat` in a subprocess, as a user runs them: replies equal the library's
greedy output, the chat keeps its conversation, hub ids resolve from a local hub cache and convert once, and every
bad input ends with one `Error:` line, exit status 1 and no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ASSETS

import mlx_internvl
from builders import Case
from mlx_internvl.chat import ChatSession
from mlx_internvl.generate import generate

IMG1, IMG2 = ASSETS / "images" / "image1.jpg", ASSETS / "images" / "chelsea.png"
CLIP = ASSETS / "video" / "carphone_pristine.mp4"


def run(args, stdin=None, env=None, timeout=300):
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "mlx_internvl.cli.main", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=full_env, timeout=timeout)


def assert_one_line_error(proc, match):
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny(build_case):
    built = build_case(Case("smoke_qwen2"))
    model, processor = mlx_internvl.load(built.original_dir)
    return built, model, processor


def test_generate_streams_the_greedy_reply(tiny):
    built, model, processor = tiny
    proc = run(["generate", "--model", built.original_dir, "--image", IMG1, "--image", IMG2, "--prompt",
                "Compare them.", "--max-tokens", 10, "--max-tiles", 2, "--verbose"])
    assert proc.returncode == 0, proc.stderr
    expected = generate(model, processor, "Compare them.", [IMG1, IMG2], max_tokens=10, max_tiles=2)
    assert proc.stdout.strip() == expected
    assert "Image-1: <image>\nImage-2: <image>\nCompare them." in proc.stderr  # --verbose prompt
    assert "Tiles per image/frame: [1, 3]" in proc.stderr  # 1000x747 -> 1x1 at 2 tiles; 451x300 -> 2x1 + thumb
    assert "Generation: " in proc.stderr and "tokens-per-sec" in proc.stderr and "Peak memory" in proc.stderr


def test_generate_with_a_video(tiny):
    built, model, processor = tiny
    proc = run(["generate", "--model", built.hf_dir, "--video", CLIP, "--num-frames", 4, "--prompt", "What happens?",
                "--max-tokens", 6, "-v"])
    assert proc.returncode == 0, proc.stderr
    assert "Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\nFrame-4: <image>\nWhat happens?" in proc.stderr
    assert proc.stdout.strip() == generate(model, processor, "What happens?", video=CLIP, num_frames=4, max_tokens=6)


def test_chat_keeps_the_conversation(tiny):
    built, model, processor = tiny
    script = f"/image {IMG1}\nWhat is it?\n/image {IMG2}\nAnd this one?\n/clear\nHello\n/exit\nnever asked\n"
    proc = run(["chat", "--model", built.original_dir, "--max-tokens", 8, "--max-tiles", 2], stdin=script)
    assert proc.returncode == 0, proc.stderr
    session = ChatSession(model, processor, max_tiles=2, max_tokens=8)

    def say(q, images=None):  # what the CLI prints: the streamed pieces, then a newline
        return "".join(r.text for r in session.stream(q, images)) + "\n"

    expected = say("What is it?", [IMG1]) + say("And this one?", [IMG2])
    session.clear()
    assert proc.stdout == expected + say("Hello")
    assert "[conversation cleared]" in proc.stderr


def test_chat_reports_a_bad_image_and_goes_on(tiny):
    built, model, processor = tiny
    proc = run(["chat", "--model", built.original_dir, "--max-tokens", 4],
               stdin="/image /no/such.png\nWhat is it?\nHi\n")
    assert proc.returncode == 0
    assert "Error: image /no/such.png: no such file" in proc.stderr
    session = ChatSession(model, processor, max_tokens=4)
    assert proc.stdout == "".join(r.text for r in session.stream("Hi")) + "\n"  # the next question was answered


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return d


@pytest.mark.parametrize("args,match", [
    (["--image", "/no/such/photo.jpg", "--prompt", "x"], "image /no/such/photo.jpg: no such file"),
    (["--image", "{bad}/corrupt.jpg", "--prompt", "x"], "corrupt.jpg: cannot be decoded"),
    (["--image", IMG1, "--prompt", "<image> and <image>"], "2 <image> placeholder(s) but 1 image"),
    (["--prompt", "word " * 700], "context is 512 tokens"),
    (["--prompt", "hi", "--template", "llama-3"], "unknown template 'llama-3'"),
    (["--video", "/no/clip.mp4"], "video /no/clip.mp4: no such file"),
    ([], "give a --prompt"),
])
def test_bad_inputs_give_one_error_line(tiny, bad_files, args, match):
    built, _, _ = tiny
    args = [str(a).replace("{bad}", str(bad_files)) for a in args]
    assert_one_line_error(run(["generate", "--model", built.original_dir, *args]), match)


@pytest.mark.parametrize("env,match", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "the hub cannot be reached"),
])
def test_unreachable_hub_and_default_model(tmp_path, env, match):
    env = dict(env, HF_HOME=str(tmp_path / "hf"), MLX_INTERNVL_CACHE=str(tmp_path / "mlx"))
    proc = run(["generate", "--prompt", "hi"], env=env)  # no --model: the default hub id
    assert_one_line_error(proc, "OpenGVLab/InternVL3-1B: not in the local Hugging Face cache")
    assert match in proc.stderr
    assert_one_line_error(run(["generate", "--model", "not/a/real/path", "--prompt", "hi"], env=env),
                          "not a hub repo id")


def fake_hub_snapshot(hf_home: Path, repo: str, src: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """What huggingface-hub leaves in its cache after downloading `repo` (refs/main -> snapshots/<commit>)."""
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    return snap


def test_hub_id_converts_once_and_is_reused(tiny, tmp_path):
    built, model, processor = tiny
    hf_home, cache = tmp_path / "hf", tmp_path / "mlx"
    fake_hub_snapshot(hf_home, "tiny-org/tiny-internvl", built.original_dir)
    env = {"HF_HOME": str(hf_home), "MLX_INTERNVL_CACHE": str(cache)}
    args = ["generate", "--model", "tiny-org/tiny-internvl", "--prompt", "Hi", "--max-tokens", 6]
    first = run(args, env=env)
    assert first.returncode == 0, first.stderr
    assert "converting tiny-org/tiny-internvl to MLX once" in first.stderr
    converted = cache / "models" / "tiny-org--tiny-internvl" / "0123456789abcdef0123456789abcdef01234567"
    assert (converted / "config.json").exists() and list(converted.glob("model*.safetensors"))
    second = run(args, env=env)
    assert second.returncode == 0 and "converting" not in second.stderr
    assert first.stdout == second.stdout
    assert first.stdout.strip() == generate(model, processor, "Hi", max_tokens=6)
    # With the hub cache gone and no network, the converted copy still serves.
    import shutil

    shutil.rmtree(hf_home)
    third = run(args, env=env)
    assert third.returncode == 0 and third.stdout == first.stdout

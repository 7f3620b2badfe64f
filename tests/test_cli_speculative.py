"""`mlx-internvl cache-prompt`, and `generate`/`chat` with `--draft-model`, `--draft-quantize` and
`--prompt-cache-file`, in a subprocess: the replies equal the library's plain greedy output, and bad input is one
`Error:` line."""

import pytest
from conftest import ASSETS
from test_cli_generate import assert_one_line_error, run

import mlx_internvl
from builders import Case
from mlx_internvl.chat import ChatSession
from mlx_internvl.generate import generate

IMG1, IMG2 = ASSETS / "images" / "image1.jpg", ASSETS / "images" / "chelsea.png"


@pytest.fixture(scope="module")
def tiny(build_case):
    built = build_case(Case("smoke_qwen2"))
    model, processor = mlx_internvl.load(built.original_dir)
    draft = build_case(Case("spec_draft_qwen2", seed=7))
    return built, model, processor, draft


def test_generate_with_drafts_and_a_cache_file(tiny, tmp_path):
    built, model, processor, draft = tiny
    expected = generate(model, processor, "Compare them.", [IMG1, IMG2], max_tokens=10, max_tiles=2)
    base = ["generate", "--model", built.original_dir, "--image", IMG1, "--image", IMG2, "--prompt", "Compare them.",
            "--max-tokens", 10, "--max-tiles", 2]
    for extra in (["--draft-quantize", 8], ["--draft-model", draft.original_dir, "--num-draft-tokens", 2]):
        proc = run(base + extra + ["-v"])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == expected
        assert "Draft: " in proc.stderr and "target passes per token" in proc.stderr
    f = tmp_path / "two.safetensors"
    proc = run(["cache-prompt", "--model", built.original_dir, "--image", IMG1, "--image", IMG2, "--max-tiles", 2,
                "--out", f])
    assert proc.returncode == 0, proc.stderr
    assert f.exists() and "Cached " in proc.stderr
    proc = run(base + ["--prompt-cache-file", f, "-v"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected
    proc = run(base + ["--prompt-cache-file", f, "--draft-quantize", 8])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_chat_with_a_cache_file_and_a_draft(tiny, tmp_path):
    built, model, processor, _ = tiny
    f = tmp_path / "one.safetensors"
    assert run(["cache-prompt", "--model", built.original_dir, "--image", IMG1, "--max-tiles", 2,
                "--out", f]).returncode == 0
    s = ChatSession(model, processor, max_tiles=2, max_tokens=8)
    a1, a2 = s.ask("What is it?", images=[IMG1]), s.ask("Sure?")
    proc = run(["chat", "--model", built.original_dir, "--image", IMG1, "--max-tiles", 2, "--max-tokens", 8,
                "--prompt-cache-file", f, "--draft-quantize", 8], stdin="What is it?\nSure?\n")
    assert proc.returncode == 0, proc.stderr
    # one reply per line, streamed raw (str.splitlines would also split at the \x0b a random model may emit)
    assert [line.strip() for line in proc.stdout.rstrip("\n").split("\n")] == [a1, a2]


@pytest.mark.slow
def test_bad_options_are_one_line_errors(tiny, tmp_path):
    built, _, _, draft = tiny
    base = ["generate", "--model", built.original_dir, "--image", IMG1, "--prompt", "Hi", "--max-tokens", 2]
    assert_one_line_error(run(base + ["--draft-quantize", 4, "--draft-model", draft.original_dir]),
                          "either --draft-model or --draft-quantize")
    assert_one_line_error(run(base + ["--draft-quantize", 8, "--max-kv-size", 512]), "plain KV cache")
    assert_one_line_error(run(base + ["--prompt-cache-file", tmp_path / "none.safetensors"]),
                          "no such prompt-cache file")
    f = tmp_path / "c.safetensors"
    assert run(["cache-prompt", "--model", built.original_dir, "--prompt", "Look.", "--out", f]).returncode == 0
    assert_one_line_error(run(base + ["--prompt-cache-file", f]), "does not extend the cached prompt")
    assert_one_line_error(run(base + ["--prompt-cache-file", f, "--dtype", "float16"]), "dtype float32")
    assert_one_line_error(run(["generate", "--model", draft.original_dir, "--prompt", "Look. Hi",
                               "--prompt-cache-file", f]), "another model or revision")
    assert_one_line_error(run(["cache-prompt", "--model", built.original_dir, "--out", tmp_path / "x.safetensors"]),
                          "nothing to cache")
    assert_one_line_error(run(["cache-prompt", "--model", built.original_dir, "--prompt", "a",
                               "--out", tmp_path / "x.npz"]), "must end in .safetensors")

"""mlx-lm's sampling options wired through generation (logit bias, presence / frequency penalty, XTC), the
tokenizer loaded by mlx-lm's own loader (streaming detokenization of real tokenizers), and the chat's line
editing and history on a real terminal (a pseudo-terminal)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlx_internvl
from builders import Case
from mlx_internvl.generate import stream_generate

ROOT = Path(__file__).parent.parent
TOKENIZERS = Path(__file__).parent / "fixtures" / "tokenizers"
PROMPT = "Tell me about the sea."


@pytest.fixture(scope="module")
def tiny(build_case):
    built = build_case(Case("sampling_tiny"))
    model, processor = mlx_internvl.load(built.original_dir)
    return built, model, processor


def tokens(model, processor, **kw):
    out = []
    for r in stream_generate(model, processor, PROMPT, max_tokens=12, **kw):
        if r.finish_reason != "stop":
            out.append(r.token)
    return out


def no_eos(processor) -> dict:
    return {t: -1e9 for t in processor.tokenizer.eos_token_ids}


def test_logit_bias_forces_a_token(tiny):
    _, model, processor = tiny
    q = processor.tokenizer.convert_tokens_to_ids("Q")
    assert tokens(model, processor, logit_bias={q: 1e4}) == [q] * 12


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_penalties_stop_repeats(tiny, penalty):
    _, model, processor = tiny
    base = tokens(model, processor, logit_bias=no_eos(processor))
    assert len(base) == 12 and len(set(base)) < 12  # the tiny random model repeats itself when left alone
    penalised = tokens(model, processor, logit_bias=no_eos(processor), **{penalty: 1e4})
    assert len(penalised) == 12 and len(set(penalised)) == 12  # mlx-lm's context for both is the last 20 tokens


def test_xtc_excludes_the_top_choice(tiny):
    """XTC with probability 1 and threshold 0 removes every token above the threshold but the least likely one,
    so the greedy first token (when it is not one of the newline/eos tokens XTC leaves alone) cannot come first."""
    _, model, processor = tiny
    bias = no_eos(processor)  # eos is one of the tokens XTC keeps; keep it out so a first token always comes
    greedy = tokens(model, processor, logit_bias=bias)[0]
    special = set(processor.tokenizer.encode("\n")) | set(processor.tokenizer.eos_token_ids)
    assert greedy not in special
    for seed in range(3):
        first = tokens(model, processor, logit_bias=bias, temperature=1.0, xtc_probability=1.0, xtc_threshold=0.0,
                       seed=seed)[0]
        assert first != greedy
    # with probability 0 XTC never applies: a near-zero temperature is greedy again
    assert tokens(model, processor, logit_bias=bias, temperature=1e-4, xtc_probability=0.0, seed=0)[0] == greedy


def test_logit_bias_from_the_command_line(tiny):
    built, _, processor = tiny
    q = processor.tokenizer.convert_tokens_to_ids("Q")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "mlx_internvl", "generate", "--model", str(built.original_dir),
                        "--prompt", PROMPT, "-m", "5", "--logit-bias", f'{{"{q}": 10000}}'],
                       capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "QQQQQ"


@pytest.mark.parametrize("name", ["qwen2_5", "internlm2", "internvl2_1b"])
def test_streaming_detokenizer_of_real_tokenizers(name):
    """The detokenizer mlx-lm picks for each real tokenizer streams Chinese and English back exactly."""
    from mlx_internvl.tokenizer import load_tokenizer

    tok = load_tokenizer(TOKENIZERS / name)
    text = "书生·万象 (InternVL) reads images: 上海人工智能实验室, naïve café ✓"
    ids = tok.encode(text, add_special_tokens=False)
    detok = tok.detokenizer
    detok.reset()
    pieces = []
    for t in ids:
        detok.add_token(t)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces).strip() == tok.decode(ids).strip() == text


def _read_until(fd, proc, needle: bytes, buf: bytearray, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while needle not in buf:
        if time.monotonic() > end or proc.poll() is not None:
            raise AssertionError(f"did not see {needle!r}; got {bytes(buf[-2000:])!r}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                buf += os.read(fd, 65536)
            except OSError:
                break


def test_chat_line_editing_and_history_on_a_terminal(tiny, tmp_path):
    built, _, _ = tiny
    master, slave = pty.openpty()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TERM="xterm",
               MLX_INTERNVL_CACHE=str(tmp_path), INPUTRC="/dev/null")
    proc = subprocess.Popen([sys.executable, "-m", "mlx_internvl", "chat", "--model", str(built.original_dir), "-m",
                             "2"], stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, close_fds=True)
    os.close(slave)
    buf = bytearray()
    try:
        def prompt_then(keys: bytes):
            _read_until(master, proc, b">> ", buf)
            del buf[:]
            os.write(master, keys)

        prompt_then(b"helo\x1b[Dl\r")  # left arrow, then insert: "hello"
        prompt_then(b"/history\r")
        _read_until(master, proc, b"User: hello", buf)
        prompt_then(b"\x1b[A\x1b[A\r")  # up twice: "hello" again, recalled from the history
        prompt_then(b"/history\r")
        _read_until(master, proc, b">> ", buf)  # the whole history is printed before the next prompt
        text = bytes(buf)
        os.write(master, b"/exit\r")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert proc.returncode == 0
    assert text.count(b"User: hello") == 2  # two turns, the second typed with the up arrow
    saved = (tmp_path / "chat_history").read_text().splitlines()
    assert saved[-5:] == ["hello", "/history", "hello", "/history", "/exit"]

"""`mlx.launch -n 2 ... mlx-internvl serve`: one model split over two ring processes on localhost, rank 0 alone
listening. A chat request with an image from the real `openai` client gets the same greedy reply as from the
one-process server on the same tiny checkpoint; so does a seeded sampled one. A stream the client drops while
another request runs is removed on both ranks at the same step: the group stays in step and answers again."""

import concurrent.futures as cf
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
from test_distributed import ENV, cli, launcher

from builders import Case
from server_util import IMG1, serving, user

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

OPTIONS = dict(max_tokens=12, max_tiles=1, dtype="float32", model_name="tiny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_of(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(url: str, **kw) -> str:
    kw = dict(dict(temperature=0, max_tokens=12), **kw)
    r = client_of(url).chat.completions.create(model="tiny", messages=[user("What is in the image?", IMG1)], **kw)
    return r.choices[0].message.content


def drop_a_stream_while_asking(url: str) -> str:
    """Start a long stream, start a second request (both in the batch), drop the stream; the second's reply."""
    stream = client_of(url).chat.completions.create(model="tiny", messages=[user("Long story please.")],
                                                    max_tokens=400, stream=True)
    next(iter(stream))
    with cf.ThreadPoolExecutor(1) as pool:
        other = pool.submit(ask, url)
        time.sleep(0.5)
        stream.close()
        return other.result(timeout=120)


def answers(url: str) -> dict:
    return dict(greedy=ask(url), seeded=ask(url, temperature=1.0, seed=5), during_drop=drop_a_stream_while_asking(url),
                after=ask(url))


def wait_idle(url: str, deadline_s: float = 30) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            if json.load(r)["inflight"] == 0:
                return
        time.sleep(0.1)
    pytest.fail("the dropped stream was not removed")


def wait_up(url: str, proc, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail("the launch exited before it listened")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the two-rank server did not listen within {deadline_s} s")


def all_gone(proc, deadline_s: float) -> bool:
    """The launcher and the ranks it started (all in its process group) have exited."""
    end = time.monotonic() + deadline_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=deadline_s)
    while time.monotonic() < end:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@contextlib.contextmanager
def launched_serve(model: str, log_path, *options: str):
    """`mlx.launch -n 2 ... mlx-internvl serve` of `model` (fp32, named tiny) on a free port, both ranks' output in
    `log_path`; yields (base_url, launcher process) once it listens, and kills every process of the launch after."""
    port = free_port()
    args = cli("serve", "--model", model, "--port", str(port), "--dtype", "float32", "--model-name", "tiny", *options)
    with open(log_path, "w+") as log:
        proc = subprocess.Popen([*launcher(), *args], env=ENV, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_up(url, proc, 240)
            yield url, proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.seek(0)
            print(log.read()[-3000:])


def test_one_request_through_rank_0(build_case, tmp_path):
    model = str(build_case(Case("dist_qwen2", text="qwen2", extra_text={"intermediate_size": 128})).hf_dir)
    with serving(model, **OPTIONS) as (url, _):
        expected = answers(url)
        wait_idle(url)
    assert expected["greedy"].strip() and expected["during_drop"] == expected["after"] == expected["greedy"]
    log = tmp_path / "serve.log"
    with launched_serve(model, log, "--max-tiles", "1", "--max-tokens", "12") as (url, proc):
        assert answers(url) == expected
        wait_idle(url)
        # Ctrl-C (SIGINT to the launch's process group): rank 0 stops and tells the follower, which ignores the
        # signal itself and leaves its loop at a step boundary. Every process of the launch is gone.
        os.killpg(proc.pid, signal.SIGINT)
        assert all_gone(proc, 60), "a rank outlived Ctrl-C"
    text = log.read_text()
    assert text.count("Serving tiny on") == 1, text[-3000:]

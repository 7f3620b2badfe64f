"""The server against a hostile client on 127.0.0.1: a web page posting to it across sites (no CORS preflight for
`text/plain`), a DNS-rebinding `Host`, a client that hangs up in the middle of its body, and SIGTERM in the middle
of a stream (a real `mlx-internvl serve` process, whose exit status and log are read)."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from builders import Case
from server_bad_requests import free_closed_port
from server_util import assert_quiet_log, serving

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

OK = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def model_dir(build_case):
    return build_case(Case("smoke_qwen2")).original_dir


def post(url, body=OK, headers=None):
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), headers=h,
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), e.headers


def test_cross_site_posts_are_refused_before_the_model_runs(model_dir):
    with serving(model_dir) as (url, app):  # no --api-key: only the origin rules protect it
        stats = app.state.engine.stats
        status, body, _ = post(url, headers={"Content-Type": "text/plain;charset=UTF-8",
                                             "Origin": "http://evil.example"})
        assert status == 415 and body["error"]["code"] == "unsupported_media_type"
        status, body, _ = post(url, headers={"Origin": "http://evil.example"})
        assert status == 403 and body["error"]["code"] == "origin_not_allowed"
        assert "--allowed-origins http://evil.example" in body["error"]["message"]
        port = url.rsplit(":", 1)[1]
        status, body, _ = post(url, headers={"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"})
        assert status == 403 and body["error"]["code"] == "host_not_allowed"
        assert stats["requests"] == 0  # nothing reached the generation thread
        # the server's own page (same origin), `localhost`, and clients without an Origin keep working
        assert post(url, headers={"Origin": url})[0] == 200
        assert post(url, headers={"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"})[0] == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert client.chat.completions.create(**OK).choices[0].message.role == "assistant"
        assert stats["requests"] == 3


def test_allowed_origins_pass_with_cors_headers(model_dir):
    with serving(model_dir, allowed_origins=["http://localhost:3000"]) as (url, _):
        status, _, headers = post(url, headers={"Origin": "http://localhost:3000"})
        assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
        assert post(url, headers={"Origin": "http://localhost:3001"})[0] == 403


def test_clients_hanging_up_mid_body_or_mid_stream_leave_no_traceback(model_dir, capfd, caplog):
    stream = json.dumps(dict(OK, max_tokens=300, stream=True)).encode()
    with serving(model_dir) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": ")
                time.sleep(0.2)
            with socket.create_connection(("127.0.0.1", port)) as s:  # a stream, reset after its first bytes
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                          b"application/json\r\nContent-Length: %d\r\n\r\n" % len(stream) + stream)
                assert s.recv(100).startswith(b"HTTP/1.1 200")
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        deadline = time.monotonic() + 20
        while app.state.engine.inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.state.engine.inflight == 0
        assert post(url)[0] == 200  # and the server answers the next client
    assert_quiet_log(capfd, caplog)


def test_sigterm_while_streaming_ends_the_stream_and_exits_0(model_dir, tmp_path):
    """uvicorn alone waits for every stream to end, then re-raises SIGTERM (exit -15): a long reply held the
    process. Now the stream is cut with an error event and `[DONE]` after --shutdown-timeout and the exit is 0."""
    port, log = free_closed_port(), tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_internvl.cli.main", "serve", "--model", str(model_dir),
                                 "--model-name", "tiny", "--port", str(port), "--shutdown-timeout", "0"],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        # token 57 ("Z") biased up: the reply runs to the context's end (~480 tokens) unless it is cut
        body = dict(OK, max_tokens=2000, stream=True, logit_bias={"57": 100})
        req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            events = [r.readline()]
            t = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            events += [line for line in r if line.strip()]
        rc = proc.wait(timeout=30)
        took = time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, log.read_text()
    assert took < 10, took
    assert events[-1].strip() == b"data: [DONE]"
    last = json.loads(events[-2].split(b":", 1)[1])
    assert last["error"]["code"] == "server_shutdown", last  # cut, long before its ~480 tokens
    assert sum(b'"content": "Z"' in e for e in events) < 400
    assert "Traceback" not in log.read_text()


def test_slow_clients_are_cut_and_others_are_answered(model_dir, capfd, caplog):
    """Headers that never end, a body that never ends, a connection that says nothing: each is closed (or gets a
    408) at its deadline, and a normal client is answered while they hang."""
    with serving(model_dir, header_timeout_s=1.0, body_timeout_s=1.5) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        sent = {"headers": b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                "body": b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
                "nothing": b""}
        socks = {}
        for what, data in sent.items():
            socks[what] = socket.create_connection(("127.0.0.1", port))
            socks[what].sendall(data)
            socks[what].settimeout(10)
        assert post(url)[0] == 200
        t = time.monotonic()
        answers = {what: s.recv(200) for what, s in socks.items()}
        assert time.monotonic() - t < 5
        for s in socks.values():
            s.close()
    assert answers["headers"] == answers["nothing"] == b""  # closed
    assert answers["body"].startswith(b"HTTP/1.1 408")
    assert_quiet_log(capfd, caplog)


def test_bodies_being_read_hold_slots_so_memory_is_bounded(model_dir):
    """A body is read inside a generation slot: with every slot held by bodies still arriving, the next request is
    a 503 before its body is read, so at most decode_concurrency + max_queue bodies (each <= --max-request-mb) are
    in memory at once, however many clients send."""
    with serving(model_dir, decode_concurrency=1, max_queue=1, body_timeout_s=30) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        slow = []
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000000\r\n\r\n" + b" " * 1000)
            slow.append(s)
        deadline = time.monotonic() + 10
        while app.state.engine.inflight < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, body, _ = post(url)
        assert status == 503 and body["error"]["code"] == "server_busy"
        for s in slow:
            s.close()
        deadline = time.monotonic() + 10
        while app.state.engine.inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert post(url)[0] == 200  # the slots came back when those clients left


def test_connections_past_the_limit_are_closed_as_they_arrive(model_dir, capfd, caplog):
    """Past `max_connections` a connection is closed at once (the default limit is the open-file limit less a
    margin, so a flood of connections never makes accept() fail, which asyncio logs as a traceback each time)."""
    with serving(model_dir, max_connections=8, header_timeout_s=5.0) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        time.sleep(0.5)
        closed = 0
        for s in socks:
            s.settimeout(0.2)
            try:
                closed += s.recv(10) == b""
            except TimeoutError:
                pass
        for s in socks:
            s.close()
        time.sleep(0.3)
        assert closed == 12, closed
        assert post(url)[0] == 200
    assert_quiet_log(capfd, caplog)


def test_a_failed_accept_is_one_warning_line(caplog):
    import asyncio

    from mlx_internvl.server.guard import quiet_accept_errors

    loop = asyncio.new_event_loop()
    try:
        quiet_accept_errors(loop, {"message": "socket.accept() out of system resource",
                                   "exception": OSError(24, "Too many open files")})
    finally:
        loop.close()
    (record,) = caplog.records
    assert record.levelname == "WARNING" and not record.exc_info and "Too many open files" in record.getMessage()

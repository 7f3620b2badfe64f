"""What the ranks of a group accept from the network, in one process (no launch): `Group.share` sends JSON plus raw
buffers and refuses anything else (a pickle is never unpickled), and rank 0's heartbeat port takes a connection as
a follower only after that follower's exact hello (stray bytes, silence, a wrong token are closed, not fatal)."""

import pickle
import socket
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_internvl import distributed, heartbeat, wire
from mlx_internvl.errors import UserError
from mlx_internvl.sampling import SamplingOptions
from mlx_internvl.server import spmd
from mlx_internvl.server.engine import Job
from mlx_internvl.server.render import ImageSpec, Prompt
from mlx_internvl.structured import Grammar, ResponseFormat


class _World:
    def __init__(self, rank: int):
        self._rank = rank

    def rank(self):
        return self._rank

    def size(self):
        return 2


def _leader_sends(monkeypatch, obj) -> bytes:
    """The bytes rank 0's `Group.share(obj)` puts on the ring (its second all-reduce)."""
    sent = []
    monkeypatch.setattr(mx.distributed, "all_sum", lambda x, group=None, **kw: sent.append(x) or x)
    assert distributed.Group(_World(0)).share(obj) is obj
    return np.array(sent[1]).tobytes()


def _follower_receives(monkeypatch, data: bytes):
    """What a follower's `Group.share(None)` returns when the ring delivers `data`."""
    arrivals = iter([mx.array(len(data), dtype=mx.int64), mx.array(np.frombuffer(data, dtype=np.uint8))])
    monkeypatch.setattr(mx.distributed, "all_sum", lambda x, group=None, **kw: next(arrivals))
    return distributed.Group(_World(1)).share(None)


def _same(a, b) -> None:
    """Equal values, types included (tuples stay tuples, int keys stay ints, arrays keep dtype and shape)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, mx.array):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


def _job() -> Job:
    tiles = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    spec = ImageSpec(("ab" * 32, 6), 2, tiles, lambda: tiles)
    sampling = SamplingOptions(temperature=0.7, top_p=0.9, logit_bias={17: -2.5, 3: 1.0}, seed=2**63 - 1)
    fmt = ResponseFormat({"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}}, strict=False)
    return Job(prompt=Prompt([1, 2, 92546, 3], [1, 2, -12345, 3], [spec], 12), sampling=sampling,
               emit=lambda ev: None, stop=["\n\n", "END"], top_logprobs=2, id=7, response_format=fmt)


def test_share_round_trips_the_real_payloads(monkeypatch):
    job = _job()
    payloads = [
        (False, [spmd._payload(job)], [4, 9]),  # the server's loop turn: stop, new jobs, dropped ids
        ("ok", ([b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "http://127.0.0.1/x.png"],  # chat's read_media result
                [np.zeros((4, 6, 3), np.uint8)])),
        ("error", "no such image file"),
        ([2, 256, 64], "bfloat16"),  # the image-feature shape and dtype rank 0 announces
        {"ints": [0, -1, 2**64, 2**100], "floats": [1.5, -0.0, float("inf")], "none": None, "flag": True},
    ]
    arrays = tuple(mx.array(np.arange(6).reshape(2, 3)).astype(dt) for dt in (
        mx.bfloat16, mx.float16, mx.float32, mx.int32, mx.uint32, mx.int64, mx.uint8, mx.bool_))
    payloads.append((arrays, mx.array(3.25, dtype=mx.bfloat16), np.arange(5, dtype=np.int16)))
    for obj in payloads:
        got = _follower_receives(monkeypatch, _leader_sends(monkeypatch, obj))
        _same(obj, got)


@pytest.mark.parametrize("kind", ["json", "tool-call grammar"])
def test_server_jobs_reach_the_followers_whole(monkeypatch, kind):
    """`spmd.exchange` on rank 0 and on a follower: the follower's job has the same ids, image key (a tuple: its
    prompt-cache pseudo id depends on it), tiles, sampling options (int logit_bias keys), stops, logprobs, its
    constraint (a JSON format or a forced tool call's grammar), thinking budget and kept tokens (every rank changes
    its logits alike)."""
    job, sent = _job(), []
    if kind != "json":
        job.response_format = Grammar('start: "<tool_call>" /[a-z]+/')
    job.thinking_budget, job.keep_tokens = 5, frozenset({92540, 92541})
    monkeypatch.setattr(mx.distributed, "all_sum", lambda x, group=None, **kw: sent.append(x) or x)
    spmd.exchange(distributed.Group(_World(0)), False, [job], [4, 9], pytest.fail, Job)
    arrivals = iter(sent)
    monkeypatch.setattr(mx.distributed, "all_sum", lambda x, group=None, **kw: next(arrivals))
    stop, [twin], dropped = spmd.exchange(distributed.Group(_World(1)), None, [], [], pytest.fail, Job)
    assert (stop, dropped) == (False, [4, 9])
    assert (twin.id, twin.sampling, twin.stop, twin.top_logprobs) == (7, job.sampling, job.stop, 2)
    assert twin.response_format == job.response_format
    assert type(twin.response_format) is type(job.response_format)
    assert (twin.thinking_budget, twin.keep_tokens) == (5, job.keep_tokens)
    assert (twin.prompt.ids, twin.prompt.keyed, twin.prompt.max_tokens) == (job.prompt.ids, job.prompt.keyed, 12)
    [spec], [orig] = twin.prompt.images, job.prompt.images
    assert spec.key == orig.key and spec.pseudo_id == orig.pseudo_id and spec.num_tiles == 2
    assert spec.tiles.dtype == np.float32 and np.array_equal(spec.tiles, orig.tiles)


class _Exploit:
    """Unpickling this runs `Path.touch` on the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_share_refuses_a_pickle_without_running_it(monkeypatch, tmp_path):
    marker = tmp_path / "ran"
    data = pickle.dumps(_Exploit(marker))
    with pytest.raises(wire.WireError, match="not in mlx-internvl's format.*never unpickled"):
        _follower_receives(monkeypatch, data)
    assert not marker.exists()
    # A well-formed header that asks for something outside the format is refused too.
    good = wire.encode(("x", np.zeros(3, np.float32)))
    bad = [good.replace(b'"np"', b'"pk"'), good.replace(b'"float32"', b'"object"'), good[:-1], good + b"\0",
           wire.MAGIC + (10**6).to_bytes(8, "little") + b"{}"]
    for data in bad:
        with pytest.raises(wire.WireError):
            _follower_receives(monkeypatch, data)
    with pytest.raises(wire.WireError, match="cannot be sent between ranks"):
        wire.encode(_Exploit(marker))


def _listen():
    server = socket.create_server(("127.0.0.1", 0))
    return server, server.getsockname()[1]


def test_heartbeat_ignores_stray_connections():
    server, port = _listen()
    token = 0x1234_5678_9ABC
    strays = []
    for first in (b"\x9c\x07\xfe\x11", b"0001", b"", heartbeat.hello(1, token + 1)):  # random 4 bytes, a would-be
        s = socket.create_connection(("127.0.0.1", port))  # rank number, silence, a wrong token
        s.sendall(first)
        strays.append(s)
    real = []

    def follower():
        time.sleep(0.3)
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(heartbeat.hello(1, token))
        real.append(s)

    t = threading.Thread(target=follower)
    t.start()
    try:
        peers = heartbeat.accept_followers(server, 2, token, timeout=20)
        t.join()
        assert set(peers) == {1}
        peers[1].sendall(b".")
        real[0].settimeout(5)
        assert real[0].recv(1) == b"."  # the accepted connection is the real follower's
        for s in strays:  # every stray was closed (the silent one when the real follower had joined)
            s.settimeout(5)
            assert s.recv(1) == b""
    finally:
        server.close()
        for s in strays + real + list(locals().get("peers", {}).values()):
            s.close()


def test_heartbeat_waits_for_the_missing_rank_then_says_which():
    server, port = _listen()
    stray = socket.create_connection(("127.0.0.1", port))
    try:
        tic = time.monotonic()
        with pytest.raises(UserError, match=r"rank\(s\) 1, 2 did not join rank 0's heartbeat within 1 s"):
            heartbeat.accept_followers(server, 3, 99, timeout=1.0)
        assert time.monotonic() - tic < 10
    finally:
        server.close()
        stray.close()


def test_chat_media_for_the_group_is_sendable(monkeypatch):
    """What rank 0 reads for `chat` under mlx.launch (image bytes, a URL, video frames) goes through the wire
    format, and the frames a follower gets are the frames rank 0 decoded."""
    pytest.importorskip("av")
    from conftest import ASSETS

    from mlx_internvl.cli.chat_cmd import read_media
    from mlx_internvl.video import load_video_frames

    clip = ASSETS / "video" / "carphone_pristine.mp4"
    image = ASSETS / "images" / "image1.jpg"
    result = read_media([str(image), "https://example.com/a.png"], str(clip), 2)
    images, frames = _follower_receives(monkeypatch, _leader_sends(monkeypatch, ("ok", result)))[1]
    assert images == [image.read_bytes(), "https://example.com/a.png"]
    expected = load_video_frames(clip, 2)
    assert len(frames) == 2 and all(np.array_equal(f, np.asarray(e)) for f, e in zip(frames, expected))


def test_a_lost_ring_connection_is_one_clear_error(monkeypatch):
    """The ring raises when a peer's socket closes (the heartbeat usually names the rank first and exits); where it
    has not, `share` says what happened as a `UserError` (one `Error:` line), not a RuntimeError traceback."""
    def lost(*args, **kwargs):
        raise RuntimeError("[ring] connection to a peer was lost")

    monkeypatch.setattr(mx.distributed, "all_sum", lost)
    for rank in (0, 1):
        with pytest.raises(UserError, match=rf"rank {rank} lost its connection to the other ranks \(\[ring\] conn"):
            distributed.Group(_World(rank)).share("x")

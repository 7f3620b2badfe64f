"""Processes that run one model together (`mlx.launch ... -- mlx-internvl generate|chat ...`): the group, what rank 0
shares with the others, and the heartbeat between them. How the model is split is `mlx_internvl.sharding`.

All ranks run the same program (SPMD): what only rank 0 sees (the stdin line, the image files, a request) is shared
with `Group.share` / `Group.on_leader` before anything depends on it, so every rank takes the same branches, keeps
the same KV caches and stops at the same token. Each sampled token is rank 0's, broadcast inside the graph
(`agree`), so ranks cannot drift apart on a near-tie. Only rank 0 prints: the others' stdout goes to /dev/null and
their stderr keeps only `Error:` lines, prefixed with the rank.

A side channel (`heartbeat`: one TCP connection from each rank to rank 0, next to the ring's own sockets) carries
a heartbeat, so that a rank whose peer died or went silent stops with one `Error:` line instead of waiting forever
inside a collective. What travels over the ring (`Group.share`) is JSON plus raw buffers (`wire`), never pickle.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream

from . import wire
from .errors import UserError
from .heartbeat import DEFAULT_TIMEOUT, TIMEOUT_ENV, Watchdog  # noqa: F401 (re-exported)

logger = logging.getLogger("mlx_internvl")

_ACTIVE: Optional[Group] = None
LOST_PEER_GRACE_S = 3.0  # a heartbeat notices a closed connection within its 1 s poll


class Group:
    """The processes running one model: `rank`, `size`, `is_leader`, and the heartbeat between them."""

    def __init__(self, world: mx.distributed.Group):
        self.world = world
        self.rank = world.rank()
        self.size = world.size()
        self.watchdog: Optional[Watchdog] = None

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (others pass anything): JSON values, tuples, dicts, bytes and numpy/MLX
        arrays, sent as JSON plus raw buffers (`wire`); nothing that arrives is unpickled or executed."""
        if self.is_leader:
            data = np.frombuffer(wire.encode(obj), dtype=np.uint8)
            with self._collective():
                settle()
                size = mx.distributed.all_sum(mx.array(data.size, dtype=mx.int64), group=self.world)
                mx.eval(size)
                mx.eval(mx.distributed.all_sum(mx.array(data), group=self.world))
            return obj
        with self._collective():
            settle()
            size = mx.distributed.all_sum(mx.array(0, dtype=mx.int64), group=self.world).item()
            data = np.array(mx.distributed.all_sum(mx.zeros((size,), dtype=mx.uint8), group=self.world))
        return wire.decode(data.tobytes())

    @contextmanager
    def _collective(self):
        """Collectives whose failure means a peer went away (the ring backend raises when its socket closes): the
        heartbeat, which sees the same closed connection, names the rank and exits; if it has not within a few
        seconds, one `UserError` says what happened instead of a traceback."""
        try:
            yield
        except RuntimeError as e:
            if self.watchdog is not None:
                time.sleep(LOST_PEER_GRACE_S)
            raise UserError(f"rank {self.rank} lost its connection to the other ranks ({e}); see their output "
                            "for why.") from e

    def on_leader(self, fn: Callable, *args, **kwargs) -> Any:
        """`fn(*args)` run on rank 0 only; every rank gets its result, or raises the `UserError` it raised."""
        result = None
        if self.is_leader:
            try:
                result = ("ok", fn(*args, **kwargs))
            except UserError as e:
                result = ("error", str(e))
        kind, value = self.share(result)
        if kind == "error":
            raise UserError(value)
        return value

    def barrier(self) -> None:
        with self._collective():
            settle()
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=self.world, stream=mx.cpu))

    def close(self) -> None:
        """The normal end: tell the peers this rank is done, so its closing connection is not taken for a crash."""
        if self.watchdog is not None:
            self.watchdog.finish()


def settle() -> None:
    """Wait for the work still queued on the generation stream (mlx-lm evaluates the next token ahead, and that
    step holds collectives): a collective issued from another stream meanwhile would meet a different collective
    on the other ranks, and the ring backend would pair them up wrongly or wait forever."""
    mx.synchronize(generation_stream)
    mx.synchronize()


def start(backend: str = "any") -> Optional[Group]:
    """The group this process was launched into (`mlx.launch`, MPI), or None when it runs alone.

    Starts the heartbeat, sends the non-leaders' output to /dev/null (errors excepted) and makes every sampler
    agree with rank 0's token."""
    global _ACTIVE
    if not mx.distributed.is_available():
        return None
    world = mx.distributed.init(backend=backend)
    if world.size() == 1:
        return None
    group = Group(world)
    group.watchdog = Watchdog.connect(group, _leader_host())
    if not group.is_leader:
        _quiet_follower(group.rank)
    _ACTIVE = group
    return group


def active() -> Optional[Group]:
    return _ACTIVE


def agree(sampler: Callable) -> Callable:
    """`sampler`, but returning rank 0's token on every rank (one tiny all-reduce inside the graph, no sync)."""
    group = _ACTIVE
    if group is None:
        return sampler

    def shared(logprobs: mx.array) -> mx.array:
        token = sampler(logprobs)
        # `token * 0`, not zeros: the all-reduce must depend on this step's logits on every rank, so that it is
        # ordered after the model's own collectives everywhere.
        mine = token if group.is_leader else token * 0
        return mx.distributed.all_sum(mine, group=group.world)

    return shared


def _quiet_follower(rank: int) -> None:
    sys.stdout = open(os.devnull, "w")
    sys.stderr = _ErrorsOnly(sys.__stderr__, f"[rank {rank}] ")
    logging.getLogger("mlx_internvl").setLevel(logging.ERROR)

    def hook(kind, value, tb):
        sys.__stderr__.write(f"[rank {rank}] " + "".join(traceback.format_exception(kind, value, tb)))

    sys.excepthook = hook


class _ErrorsOnly(io.TextIOBase):
    """stderr of a non-leader rank: rank 0 already shows the chat prompts and statistics; errors still show."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix = stream, prefix

    def write(self, s: str) -> int:
        if s.startswith("Error"):
            self.stream.write(self.prefix + s)
            self.stream.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def _leader_host() -> Optional[str]:
    """Rank 0's address as the launcher gave it: the ring hostfile's first entry, or the JACCL coordinator."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and Path(hostfile).is_file():
        try:
            hosts = json.loads(Path(hostfile).read_text())
            first = hosts[0][0] if isinstance(hosts[0], list) else hosts[0]
            return first.rsplit(":", 1)[0]
        except (ValueError, IndexError, KeyError, TypeError, AttributeError):
            return None
    coordinator = os.environ.get("MLX_JACCL_COORDINATOR")
    if coordinator:
        return coordinator.rsplit(":", 1)[0]
    return None

"""The heartbeat between the ranks of a group: one TCP connection from each follower to rank 0, beside the ring's
own sockets. A rank whose peer closes its connection (the process died) or stays silent for
`MLX_INTERNVL_PEER_TIMEOUT` seconds prints one `Error:` line and exits with status 1, even while its main thread
is blocked inside a collective, which MLX cannot time out.

Rank 0 listens on a port anyone on the network can reach, so a connection counts as a follower only after it sends
the exact hello of a rank still missing: a magic string, its rank and a random token that rank 0 handed out over
the ring. Anything else (a port scanner, a stray client, bytes that are not a hello, silence) is closed and logged,
and rank 0 keeps waiting for the real followers until the timeout.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import selectors
import socket
import sys
import threading
import time
from typing import Dict, Optional

import mlx.core as mx

from .errors import UserError

logger = logging.getLogger("mlx_internvl")

TIMEOUT_ENV = "MLX_INTERNVL_PEER_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
HELLO_MAGIC = b"MIVLHB01"
HELLO_SIZE = len(HELLO_MAGIC) + 4 + 8
HELLO_WAIT_S = 5.0  # how long one connection may take to send its hello


def hello(rank: int, token: int) -> bytes:
    """What follower `rank` sends first: magic, rank (4 bytes), the group's token (8 bytes), big-endian."""
    return HELLO_MAGIC + rank.to_bytes(4, "big") + token.to_bytes(8, "big")


class Watchdog:
    """Liveness of the peers over one TCP connection per follower to rank 0 (bytes: '.' alive, 'B' finished)."""

    def __init__(self, group, peers: Dict[int, socket.socket], timeout: float):
        self.group, self.peers, self.timeout = group, peers, timeout
        self.finished = threading.Event()
        self.lock = threading.Lock()
        for rank, sock in peers.items():
            threading.Thread(target=self._watch, args=(rank, sock), daemon=True, name=f"heartbeat-{rank}").start()

    @classmethod
    def connect(cls, group, host: Optional[str]) -> Optional[Watchdog]:
        """The heartbeat of `group` (a `distributed.Group`), rank 0 listening on `host`; None without a host."""
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
        if host is None or timeout <= 0:
            logger.info("no heartbeat between ranks (no ring hostfile or JACCL coordinator to find rank 0 by)")
            return None
        server, port, token = None, 0, 0
        if group.is_leader:
            server = socket.create_server((host, 0))
            port, token = server.getsockname()[1], secrets.randbits(62)
        port, token = mx.distributed.all_sum(mx.array([port, token], dtype=mx.int64), group=group.world).tolist()
        if group.is_leader:
            try:
                peers = accept_followers(server, group.size, token, timeout)
            finally:
                server.close()
        else:
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.sendall(hello(group.rank, token))
            peers = {0: sock}
        return cls(group, peers, timeout)

    def _watch(self, rank: int, sock: socket.socket) -> None:
        interval = min(1.0, self.timeout / 4)
        sock.settimeout(interval)
        last = time.monotonic()
        while not self.finished.is_set():
            try:
                data = sock.recv(64)
            except TimeoutError:
                data = None
            except OSError:
                data = b""
            now = time.monotonic()
            if data == b"":
                if not self.finished.is_set():
                    self._fail(f"rank {rank} is gone (its connection closed: the process exited or was killed); "
                               f"rank {self.group.rank} stops too. See rank {rank}'s output for why.")
                return
            if data:
                if b"B" in data:
                    return  # that peer ended normally
                last = now
            elif now - last > self.timeout:
                self._fail(f"rank {rank} sent no heartbeat for {self.timeout:.0f} s (host asleep or unreachable, "
                           f"or the process stopped); rank {self.group.rank} stops too. Raise {TIMEOUT_ENV} if "
                           "that rank is only slow.")
                return
            try:
                sock.sendall(b".")
            except OSError:
                pass

    def _fail(self, message: str) -> None:
        with self.lock:
            try:
                sys.__stdout__.flush()
            except Exception:
                pass
            os.write(2, f"Error: {message}\n".encode())
            os._exit(1)

    def finish(self) -> None:
        self.finished.set()
        for sock in self.peers.values():
            try:
                sock.sendall(b"B")
                sock.close()
            except OSError:
                pass


def accept_followers(server: socket.socket, size: int, token: int, timeout: float) -> Dict[int, socket.socket]:
    """{rank: connection} for ranks 1..size-1, each known by its exact `hello`; every other connection is closed
    (and logged) without stopping the wait. A `UserError` when a rank has not said hello within `timeout` s."""
    waiting = _Handshakes({hello(r, token): r for r in range(1, size)})
    server.setblocking(False)
    end = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(server, selectors.EVENT_READ)
        while len(waiting.peers) < size - 1:
            if time.monotonic() > end:
                waiting.close_all()
                missing = sorted(set(range(1, size)) - set(waiting.peers))
                raise UserError(f"rank(s) {', '.join(map(str, missing))} did not join rank 0's heartbeat within "
                                f"{timeout:.0f} s; check that every rank started and can reach rank 0, or raise "
                                f"{TIMEOUT_ENV}.")
            for key, _ in sel.select(timeout=0.2):
                if key.fileobj is server:
                    waiting.accept(server, sel)
                else:
                    waiting.read(key.fileobj, sel)
            waiting.expire(sel)
    waiting.close_all()
    return waiting.peers


class _Handshakes:
    """The connections rank 0 accepted and is reading a hello from (non-blocking, several at once)."""

    def __init__(self, expected: Dict[bytes, int]):
        self.expected = expected
        self.peers: Dict[int, socket.socket] = {}
        self.pending: Dict[socket.socket, list] = {}  # conn -> [bytes so far, deadline, address]

    def accept(self, server: socket.socket, sel) -> None:
        try:
            conn, addr = server.accept()
        except OSError:
            return
        conn.setblocking(False)
        self.pending[conn] = [b"", time.monotonic() + HELLO_WAIT_S, addr]
        sel.register(conn, selectors.EVENT_READ)

    def read(self, conn: socket.socket, sel) -> None:
        state = self.pending[conn]
        try:
            chunk = conn.recv(HELLO_SIZE - len(state[0]))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        state[0] += chunk
        data = state[0]
        if not chunk:
            return self.drop(conn, sel, "it closed before a full hello")
        if not HELLO_MAGIC.startswith(data[:len(HELLO_MAGIC)]):
            return self.drop(conn, sel, "it is not an mlx-internvl rank")
        if len(data) < HELLO_SIZE:
            return
        rank = next((r for h, r in self.expected.items() if hmac.compare_digest(h, data)), None)
        if rank is None or rank in self.peers:
            return self.drop(conn, sel, "wrong token or rank" if rank is None else f"rank {rank} already joined")
        sel.unregister(conn)
        del self.pending[conn]
        conn.setblocking(True)
        self.peers[rank] = conn

    def expire(self, sel) -> None:
        now = time.monotonic()
        for conn, (_, deadline, _) in list(self.pending.items()):
            if now > deadline:
                self.drop(conn, sel, f"no hello within {HELLO_WAIT_S:.0f} s")

    def drop(self, conn: socket.socket, sel, why: str) -> None:
        addr = self.pending.pop(conn)[2]
        logger.warning("heartbeat: closed a connection from %s (%s)", addr, why)
        sel.unregister(conn)
        conn.close()

    def close_all(self) -> None:
        for conn in self.pending:
            conn.close()
        self.pending.clear()

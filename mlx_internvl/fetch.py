"""Downloading an http(s) URL under rules that make it safe to do on behalf of someone else: the one fetcher, used
by `open_image` (library, CLI, LoRA data) and by the server's media.

- One deadline for the whole fetch: DNS, connect, TLS, status line, headers and body of every redirect hop
  together. It is enforced from outside the blocking calls: a single watchdog thread shuts a fetch's socket down
  when its time is up (a per-read timeout alone lets a server that trickles header bytes hold a fetch for
  minutes). Names are resolved on a few daemon threads (at most `RESOLVER_THREADS` at once), waited for only
  until the deadline.
- Every address a host resolves to is vetted (`is_public`), and the connection goes to the vetted address (the
  Host header, TLS SNI and certificate check still use the name), so DNS rebinding between the check and the
  connect cannot get around it. Non-public addresses (loopback, private, link-local, multicast, reserved,
  unspecified, and IPv4 addresses embedded in IPv6 forms of those) are refused unless the policy allows them; even
  then, only on the host and port of the URL as given: a redirect elsewhere must land on a public address.
- Redirects are followed here, at most `max_redirects` hops, each re-checked (http and https only).
- The body is capped at `max_bytes`. Proxies from the environment are not used (a proxy would defeat the checks).

The standard library's `http.client` is used, not urllib (which follows redirects to any host, port and ftp://
on its own) nor httpx (not a declared dependency): it takes an already-connected socket, which is what connecting
to a vetted address while speaking to a host name needs.
"""

from __future__ import annotations

import heapq
import http.client
import ipaddress
import itertools
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple
from urllib.parse import urljoin, urlsplit

from .errors import UserError

RESOLVER_THREADS = 8
REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class FetchError(UserError):
    """A URL that was not fetched; the message says why (a server shows its clients one uniform text instead)."""


@dataclass(frozen=True)
class FetchPolicy:
    """The rules of one fetch. `allow_private`: the URL as given may be on a non-public address (redirects to
    another host or port must still land on public ones)."""

    allow_private: bool = False
    deadline_s: float = 60.0
    max_bytes: int = 64 << 20
    max_redirects: int = 5

    def __post_init__(self):
        if not (self.deadline_s > 0 and self.max_bytes > 0 and self.max_redirects >= 0):
            raise ValueError(f"FetchPolicy: deadline_s and max_bytes must be > 0 and max_redirects >= 0, got {self}")


def is_public(ip: ipaddress._BaseAddress) -> bool:
    """Whether `ip` is a public unicast address; IPv4 addresses inside IPv6 (mapped, 6to4, NAT64) are judged as
    the IPv4 address they carry."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return is_public(inner)
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


class _Watch:
    """One fetch's deadline, and the socket the watchdog shuts down when it passes."""

    def __init__(self, end: float):
        self.end, self.expired, self.done, self.sock = end, False, False, None


class _Watchdog:
    """One thread for every fetch of the process: at each watched deadline it shuts that fetch's socket down, which
    wakes whatever read, write or handshake is blocked on it. Sockets are attached and detached under the lock,
    and only closed after they are detached, so a number the kernel reuses is never shut down by mistake."""

    def __init__(self):
        self._cond = threading.Condition()
        self._heap: List[Tuple[float, int, _Watch]] = []
        self._count = itertools.count()
        self._thread: Optional[threading.Thread] = None

    def start(self, end: float) -> _Watch:
        watch = _Watch(end)
        with self._cond:
            heapq.heappush(self._heap, (end, next(self._count), watch))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mlx-internvl-fetch-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        return watch

    def attach(self, watch: _Watch, sock) -> None:
        with self._cond:
            if watch.expired:
                raise TimeoutError("deadline")
            watch.sock = sock

    def detach(self, watch: _Watch, done: bool = False) -> None:
        with self._cond:
            watch.sock, watch.done = None, watch.done or done

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    _, _, watch = heapq.heappop(self._heap)
                    if not watch.done:
                        watch.expired = True
                        _shut(watch.sock)
                self._cond.wait(self._heap[0][0] - now if self._heap else None)


def _shut(sock) -> None:
    if sock is None:
        return
    try:  # the plain socket's shutdown, also for an SSLSocket: it must not touch the TLS state another thread uses
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # not connected yet, or already closed: the fetch sees `expired` when it next attaches or checks


_WATCHDOG = _Watchdog()
_RESOLVERS = threading.BoundedSemaphore(RESOLVER_THREADS)


def _left(watch: _Watch) -> float:
    left = watch.end - time.monotonic()
    if left <= 0 or watch.expired:
        raise TimeoutError("deadline")
    return left


def _resolve(host: str, port: int, watch: _Watch) -> list:
    """getaddrinfo's (family, sockaddr) pairs for `host`, waited for only until the deadline."""
    try:
        ip = ipaddress.ip_address(host)
        return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (host, port))]
    except ValueError:
        pass
    if not _RESOLVERS.acquire(timeout=_left(watch)):
        raise TimeoutError("deadline (every resolver thread is busy)")
    box: dict = {}
    done = threading.Event()

    def work():
        try:
            box["found"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            box["error"] = e
        finally:
            _RESOLVERS.release()
            done.set()

    threading.Thread(target=work, name="mlx-internvl-resolve", daemon=True).start()
    if not done.wait(_left(watch)):
        raise TimeoutError("deadline (name not resolved in time)")
    if "error" in box:
        raise FetchError(f"cannot resolve {host} ({box['error']})")
    return [(family, addr) for family, _, _, _, addr in box["found"]]


def _vet(host: str, addresses: list, private_ok: bool) -> None:
    for _, addr in addresses:
        ip = ipaddress.ip_address(addr[0].split("%")[0])
        if not private_ok and not is_public(ip):
            raise FetchError(f"{host} is at {ip}, which is not a public address; fetching from it is not allowed")


def _connect(host: str, addresses: list, https: bool, watch: _Watch):
    """A socket connected to the first of `addresses` that answers (TLS set up for `host` when `https`)."""
    error: Optional[OSError] = None
    for family, addr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            _WATCHDOG.attach(watch, sock)
            sock.settimeout(_left(watch))
            sock.connect(addr)
            if https:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host,
                                                                do_handshake_on_connect=False)
                _WATCHDOG.attach(watch, sock)
                sock.settimeout(_left(watch))
                sock.do_handshake()
            sock.settimeout(_left(watch))
            return sock
        except ssl.SSLError:
            _close(watch, sock)
            raise
        except OSError as e:
            _close(watch, sock)
            if isinstance(e, TimeoutError) or watch.expired:
                raise
            error = e
    raise FetchError(f"cannot connect to {host} ({getattr(error, 'strerror', None) or error})")


def _close(watch: _Watch, sock) -> None:
    _WATCHDOG.detach(watch)
    sock.close()


class _Connection(http.client.HTTPConnection):
    """http.client over a socket that is already connected (to a vetted address)."""

    def __init__(self, host: str, port: int, sock, https: bool):
        super().__init__(host, port)
        self.sock, self.default_port = sock, 443 if https else 80

    def connect(self):
        raise http.client.HTTPException("the connection was closed")  # never reconnect behind the checks


def _target(url: str, max_redirects: int, hop: int) -> Tuple[str, str, int, str]:
    """(scheme, host, port, path?query) of `url`, or why it cannot be fetched."""
    if hop > max_redirects:
        raise FetchError(f"more than {max_redirects} redirects")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise FetchError(f"not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise FetchError(f"{'a redirect to ' if hop else ''}a {parts.scheme or 'relative'}: URL; only http and "
                         "https are fetched")
    if not parts.hostname:
        raise FetchError("the URL has no host")
    try:  # the ASCII (IDNA) form, as DNS, the Host header and TLS SNI need it
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise FetchError(f"{parts.hostname!r} is not a valid host name") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path


def _body(response: http.client.HTTPResponse, watch: _Watch, max_bytes: int) -> bytes:
    if response.length is not None and response.length > max_bytes:
        raise FetchError(f"{response.length} bytes is over the {max_bytes}-byte limit")
    chunks, size = [], 0
    while True:
        block = response.read(65536)
        if watch.expired:  # the watchdog's shutdown reads as the end of the body
            raise TimeoutError("deadline")
        if not block:
            return b"".join(chunks)
        size += len(block)
        if size > max_bytes:
            raise FetchError(f"more than {max_bytes} bytes, the limit")
        chunks.append(block)


def _hop(url: str, policy: FetchPolicy, watch: _Watch, origin, hop: int) -> Tuple[Optional[bytes], str, tuple]:
    """One request: (body, url, origin) when it is the answer, (None, next url, origin) on a redirect."""
    scheme, host, port, path = _target(url, policy.max_redirects, hop)
    origin = origin or (host, port)
    addresses = _resolve(host, port, watch)
    _vet(host, addresses, policy.allow_private and (host, port) == origin)
    sock = _connect(host, addresses, scheme == "https", watch)
    conn = _Connection(host, port, sock, scheme == "https")
    try:
        conn.request("GET", path, headers={"User-Agent": "mlx-internvl", "Accept-Encoding": "identity",
                                           "Accept": "image/*, video/*, */*;q=0.5", "Connection": "close"})
        response = conn.getresponse()
        if response.status in REDIRECTS and response.getheader("Location"):
            return None, urljoin(url, response.getheader("Location")), origin
        if response.status != 200:
            raise FetchError(f"HTTP {response.status} {response.reason}".rstrip())
        return _body(response, watch, policy.max_bytes), url, origin
    finally:
        _WATCHDOG.detach(watch)
        conn.close()


def fetch_url(url: str, policy: FetchPolicy = FetchPolicy()) -> bytes:
    """The body at an http(s) `url` under `policy`; a `FetchError` saying why for anything else (refused address
    or scheme, too many redirects, HTTP error, connection or TLS failure, over the size cap or the deadline)."""
    watch = _WATCHDOG.start(time.monotonic() + policy.deadline_s)
    body, origin, hop = None, None, 0
    try:
        while body is None:
            body, url, origin = _hop(url, policy, watch, origin, hop)
            hop += 1
        return body
    except FetchError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:  # TimeoutError and SSLError are OSErrors
        if watch.expired or isinstance(e, TimeoutError) or time.monotonic() >= watch.end:
            raise FetchError(f"not downloaded within the {policy.deadline_s:g} s deadline") from None
        raise FetchError(f"{type(e).__name__}: {e}") from None
    finally:
        _WATCHDOG.detach(watch, done=True)

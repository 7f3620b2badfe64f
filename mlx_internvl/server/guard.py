"""What the server refuses before reading a request, and how it stops.

Browsers send a `text/plain` or body-typeless POST to any site without asking it first (no CORS preflight), so a
POST must be `application/json` and, when it carries an `Origin`, come from the server's own origin or an
`--allowed-origins` one. On a loopback address the `Host` must be a loopback name too: a DNS-rebinding page is
"same origin" with its own host name. Clients that are not browsers (curl, the `openai` package) send no `Origin`
and pass. On SIGTERM or Ctrl-C, running replies may go on for `shutdown_timeout_s`, then they are ended (the app
reads `shutdown_at`) and the process exits 0.

Slow clients: uvicorn waits forever for request headers that never end (its keep-alive timeout covers only an idle
connection with nothing sent), so `HTTPProtocol` closes a connection whose headers have not all arrived
`header_timeout_s` after it opened or after its last reply; the app gives the body `body_timeout_s`. Connections
past `max_connections` (default: the open-file limit less a margin) are closed as they arrive, so the process never
runs out of file descriptors, where asyncio would log a traceback for every failed accept.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import time
from typing import Optional, Sequence
from urllib.parse import urlsplit

import uvicorn
from starlette.requests import Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import APIError

try:
    import resource
except ImportError:  # Windows
    resource = None

logger = logging.getLogger("mlx_internvl.server")
# asyncio accepts up to `backlog` connections per wake-up before any is closed: kept under the descriptor margin
ACCEPT_BACKLOG = 128

_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def _hostname(host: str) -> str:
    """The name in a `Host` header or an origin, without port or brackets, lowercased."""
    try:
        return (urlsplit(f"//{host}").hostname or "") if host else ""
    except ValueError:  # "[not-an-ip6": no name at all
        return ""


def loopback_names(host: str, allowed_origins: Sequence[str]) -> Optional[set]:
    """The `Host` names accepted when the server listens on a loopback address (None: any, it is exposed)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return None
    return _LOOPBACK_NAMES | {_hostname(urlsplit(o).netloc) for o in allowed_origins if o != "*"}


def check_browser(request: Request, allowed_origins: Sequence[str], loopback: Optional[set],
                  json_body: bool = True) -> None:
    """Refuse what a web page could send on its own: a non-JSON POST (`json_body`), a foreign `Origin`, a rebound
    `Host`."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if json_body and ctype != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}; send the body as "
                            "JSON with 'Content-Type: application/json'", None, "unsupported_media_type")
    host = request.headers.get("host", "")
    if loopback is not None and host and _hostname(host) not in loopback:  # browsers always send a Host
        raise APIError(403, f"Host {host[:100]!r} is not a loopback name: this server listens on a loopback "
                            "address and answers only requests addressed to it (a page on another host name may be "
                            "a DNS-rebinding attack); add its origin with --allowed-origins to allow it", None,
                       "host_not_allowed")
    origin = request.headers.get("origin")
    if origin is None or "*" in allowed_origins or origin in allowed_origins:
        return
    if origin != f"{request.url.scheme}://{host}":
        raise APIError(403, f"cross-origin request from {origin[:100]!r} refused: only this server's own page "
                            "may call it from a browser; start the server with --allowed-origins "
                            f"{origin[:100]} to allow that site", None, "origin_not_allowed")


def connection_limit(configured: Optional[int]) -> int:
    """`configured`, or the soft open-file limit less 256 descriptors for the model's files, logs and the like."""
    if configured is not None:
        return configured
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (AttributeError, OSError, ValueError):  # no `resource` module (Windows)
        return 1024
    return max(32, soft - 256) if soft != resource.RLIM_INFINITY else 1 << 16


def quiet_accept_errors(loop, context) -> None:
    """The event loop's error handler: a failed accept (out of descriptors or memory) is one warning line, not a
    traceback per attempt; anything else goes to asyncio's default handler."""
    if context.get("message", "").startswith("socket.accept() out of system resource"):
        logger.warning("cannot accept a connection: %s (lower --max-connections or raise `ulimit -n`)",
                       context.get("exception"))
        return
    loop.default_exception_handler(context)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, whose SIGTERM / Ctrl-C ends running replies `shutdown_timeout_s` later (uvicorn alone waits
    for every stream to finish) and returns normally, so the process exits 0 (uvicorn re-raises the signal)."""

    async def startup(self, sockets=None) -> None:
        asyncio.get_running_loop().set_exception_handler(quiet_accept_errors)
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        st = self.config.app.state.server
        if st.shutdown_at is None:
            st.shutdown_at = time.monotonic() + st.cfg.shutdown_timeout_s
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
        self.should_exit = True


class HTTPProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request line and headers (`header_timeout_s` of the app's
    `ServerConfig`); a request whose headers arrived in time is the app's to bound."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > connection_limit(self.config.app.state.config.max_connections):
            transport.close()  # over the limit: refused before it costs more than this descriptor
            return
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        timeout = self.config.app.state.config.header_timeout_s
        self._header_deadline = self.loop.call_later(timeout, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        handle = getattr(self, "_header_deadline", None)
        if handle is not None:
            handle.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        waiting = self.cycle is None or self.cycle.response_complete  # no request in progress
        if waiting and not self.transport.is_closing():
            self.transport.close()

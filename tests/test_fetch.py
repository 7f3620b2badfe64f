"""The one fetcher (`mlx_internvl.fetch`) against loopback servers of our own: one deadline for the whole fetch
(a server trickling header bytes is cut), redirects re-checked (no other host or port, no ftp://), non-public
addresses refused unless allowed, the connection made to the vetted address, and the server's one error text for
every failed remote URL."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from mlx_internvl.fetch import FetchError, FetchPolicy, fetch_url, is_public

LOOPBACK_OK = FetchPolicy(allow_private=True, deadline_s=5)


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


@contextlib.contextmanager
def http_server(routes: dict, tls: ssl.SSLContext = None):
    """127.0.0.1 server: `routes` maps a path to (status, headers, body); `seen` records (path, Host header)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Host")))
            status, headers, body = routes.get(self.path, (404, {}, b"no such thing"))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    if tls is not None:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1], seen
    finally:
        srv.shutdown()
        srv.server_close()


@contextlib.contextmanager
def raw_server(talk):
    """127.0.0.1 listener; each connection is handed to `talk(conn)` on its own thread. Yields (port, accepted)."""
    lst = socket.create_server(("127.0.0.1", 0))
    accepted, stop = [], threading.Event()

    def loop():
        lst.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = lst.accept()
            except OSError:
                continue
            accepted.append(conn)
            threading.Thread(target=talk, args=(conn, stop), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield lst.getsockname()[1], accepted
    finally:
        stop.set()
        t.join()
        lst.close()
        for c in accepted:
            c.close()


def trickle_headers(conn, stop):
    """A status line, then one header byte every 0.3 s for 10 s (http.client allows 100 headers of 64 KB)."""
    try:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Slow: ")
        end = time.monotonic() + 10
        while time.monotonic() < end and not stop.is_set():
            conn.sendall(b"a")
            time.sleep(0.3)
    except OSError:
        pass


def silent(conn, stop):
    stop.wait(10)


def trickle_tls(conn, stop):
    """Takes the ClientHello, announces a 16 KB handshake record, then sends it a byte every 0.3 s for 10 s."""
    try:
        conn.recv(65536)
        conn.sendall(b"\x16\x03\x03\x40\x00")
        end = time.monotonic() + 10
        while time.monotonic() < end and not stop.is_set():
            conn.sendall(b"\x02")
            time.sleep(0.3)
    except OSError:
        pass


def test_header_trickle_is_cut_at_the_deadline():
    with raw_server(trickle_headers) as (port, _):
        t = time.monotonic()
        with pytest.raises(FetchError, match="within the 1 s deadline"):
            fetch_url(f"http://127.0.0.1:{port}/x.png", FetchPolicy(allow_private=True, deadline_s=1))
        assert time.monotonic() - t < 3  # the server would go on for 10 s


def test_tls_handshake_that_trickles_is_cut_at_the_deadline():
    with raw_server(trickle_tls) as (port, _):
        t = time.monotonic()
        with pytest.raises(FetchError, match="deadline"):
            fetch_url(f"https://127.0.0.1:{port}/x.png", FetchPolicy(allow_private=True, deadline_s=1))
        assert time.monotonic() - t < 3


def test_a_name_lookup_that_hangs_is_cut_at_the_deadline_on_few_threads(monkeypatch):
    """20 fetches at once of a name whose lookup never returns: all cut at the 1 s deadline, and no more than
    `RESOLVER_THREADS` threads are left waiting on the resolver."""
    from mlx_internvl import fetch as fetch_module

    release = threading.Event()
    real = socket.getaddrinfo

    def hangs(host, *a, **k):
        if host != "hangs.example":
            return real(host, *a, **k)
        release.wait(20)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", hangs)
    errors = []

    def one():
        try:
            fetch_url("http://hangs.example/x.png", FetchPolicy(deadline_s=1))
        except FetchError as e:
            errors.append(str(e))

    t, waiting = time.monotonic(), []
    workers = [threading.Thread(target=one) for _ in range(20)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join(10)
        took = time.monotonic() - t
        waiting = [th for th in threading.enumerate() if th.name == "mlx-internvl-resolve"]
    finally:
        release.set()
        for th in waiting:
            th.join(5)
    assert took < 3 and len(errors) == 20 and all("within the 1 s deadline" in e for e in errors), (took, errors)
    assert 0 < len(waiting) <= fetch_module.RESOLVER_THREADS


def test_loopback_refused_by_default_and_allowed_by_the_option():
    with http_server({"/x.png": (200, {}, png())}) as (port, seen):
        for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]"):
            with pytest.raises(FetchError, match="not a public address"):
                fetch_url(f"http://{host}:{port}/x.png")
        assert seen == []  # refused before any connection
        assert fetch_url(f"http://127.0.0.1:{port}/x.png", LOOPBACK_OK) == png()
        assert fetch_url(f"http://localhost:{port}/x.png", LOOPBACK_OK) == png()


@pytest.mark.parametrize("address,public", [
    ("93.184.215.14", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("127.5.5.5", False),
    ("10.0.0.1", False), ("172.16.3.4", False), ("192.168.1.1", False), ("169.254.169.254", False),
    ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.251", False), ("240.0.0.1", False),
    ("255.255.255.255", False), ("::1", False), ("::", False), ("fe80::1", False), ("fc00::1", False),
    ("ff02::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("::ffff:93.184.215.14", True),
    ("2002:7f00:1::", False), ("2002:a00:1::", False), ("64:ff9b::a9fe:a9fe", False)])
def test_address_classes(address, public):
    """RFC 6890's special-purpose ranges, and IPv4 ones carried in IPv6 (mapped, 6to4, NAT64)."""
    assert is_public(ipaddress.ip_address(address)) is public


def test_a_name_is_vetted_then_connected_to_at_the_vetted_address(monkeypatch):
    """The name resolves once; the socket goes to that address while the Host header keeps the name."""
    calls = []
    real = socket.getaddrinfo

    def fake(host, port, *a, **k):
        calls.append(host)
        if host == "images.example":
            return real("127.0.0.1", port, *a, **k)
        if host == "intranet.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port))]
        return real(host, port, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with http_server({"/x.png": (200, {}, png())}) as (port, seen):
        assert fetch_url(f"http://images.example:{port}/x.png", LOOPBACK_OK) == png()
        assert seen == [("/x.png", f"images.example:{port}")] and calls == ["images.example"]
        with pytest.raises(FetchError, match="10.1.2.3, which is not a public address"):
            fetch_url(f"http://intranet.example:{port}/x.png", FetchPolicy(deadline_s=5))


def test_redirects_are_followed_only_where_the_rules_allow():
    with http_server({"/x.png": (200, {}, png())}) as (other, other_seen):
        routes = {"/same": (302, {"Location": "/x.png"}, b""), "/x.png": (200, {}, png()),
                  "/port": (302, {"Location": f"http://127.0.0.1:{other}/x.png"}, b"")}
        with http_server(routes) as (port, seen):
            routes["/host"] = (301, {"Location": f"http://localhost:{port}/x.png"}, b"")
            routes["/loop"] = (307, {"Location": "/loop"}, b"")
            base = f"http://127.0.0.1:{port}"
            assert fetch_url(base + "/same", LOOPBACK_OK) == png()  # same host and port: followed
            for path in ("/port", "/host"):
                with pytest.raises(FetchError, match="not a public address"):
                    fetch_url(base + path, LOOPBACK_OK)
            with pytest.raises(FetchError, match="more than 5 redirects"):
                fetch_url(base + "/loop", LOOPBACK_OK)
            assert [p for p, _ in seen].count("/loop") == 6
    assert other_seen == []  # the other port was never asked


def test_redirect_to_ftp_is_refused():
    with raw_server(silent) as (ftp_port, accepted):
        routes = {"/x.png": (302, {"Location": f"ftp://127.0.0.1:{ftp_port}/x.png"}, b"")}
        with http_server(routes) as (port, _):
            with pytest.raises(FetchError, match="only http and https"):
                fetch_url(f"http://127.0.0.1:{port}/x.png", LOOPBACK_OK)
        time.sleep(0.2)
        assert accepted == []


@pytest.mark.parametrize("url,words", [
    ("ftp://127.0.0.1/x.png", "only http and https"), ("file:///etc/hostname", "only http and https"),
    ("http://127.0.0.1:99999/x.png", "not a valid URL"), ("http:///x.png", "no host")])
def test_urls_that_are_not_fetched(url, words):
    with pytest.raises(FetchError, match=words):
        fetch_url(url, LOOPBACK_OK)


@pytest.fixture
def tls(tmp_path, monkeypatch):
    """A server context with a certificate for `localhost`, which `ssl.create_default_context()` then trusts."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    return server


def test_https_speaks_to_the_name_over_the_vetted_address(tls):
    """TLS to `localhost`: certificate checked against the name (SNI too), connection to its loopback address."""
    names = []
    tls.sni_callback = lambda sock, name, ctx: names.append(name)
    with http_server({"/x.png": (200, {}, png())}, tls=tls) as (port, seen):
        assert fetch_url(f"https://localhost:{port}/x.png", LOOPBACK_OK) == png()
        assert names == ["localhost"] and seen == [("/x.png", f"localhost:{port}")]
        with pytest.raises(FetchError, match="SSL"):  # the certificate is not for 127.0.0.1
            fetch_url(f"https://127.0.0.1:{port}/x.png", LOOPBACK_OK)


def test_header_trickle_over_tls_is_cut_at_the_deadline(tls):
    def talk(conn, stop):
        try:
            with tls.wrap_socket(conn, server_side=True) as tconn:
                tconn.recv(65536)
                trickle_headers(tconn, stop)
        except OSError:
            pass

    with raw_server(talk) as (port, _):
        t = time.monotonic()
        with pytest.raises(FetchError, match="within the 1 s deadline"):
            fetch_url(f"https://localhost:{port}/x.png", FetchPolicy(allow_private=True, deadline_s=1))
        assert time.monotonic() - t < 3


@contextlib.contextmanager
def logged_by(name: str):
    """The messages `name` logs at any level, whatever the CLI's logging set-up did to its parents."""
    import logging

    lines, logger = [], logging.getLogger(name)
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_the_server_answers_one_text_for_every_failed_remote_url():
    """Refused address, refused redirects, 404, not an image, empty, too large, connection refused, too slow: a
    client sees the same 400, so it cannot tell an open port from a closed one (the log at debug level can)."""
    pytest.importorskip("fastapi")
    from mlx_internvl.server.media import MediaPolicy, fetch
    from mlx_internvl.server.protocol import APIError

    lax = MediaPolicy(allow_remote=True, allow_private_hosts=True, remote_timeout_s=1, max_bytes=50_000)
    strict = MediaPolicy(allow_remote=True, remote_timeout_s=1)
    clip = (Path(__file__).parent / "fixtures" / "video" / "carphone_pristine.mp4").read_bytes()
    with http_server({"/x.png": (200, {}, png())}) as (other, _), raw_server(trickle_headers) as (slow, _):
        routes = {"/x.png": (200, {}, png()), "/clip.mp4": (200, {}, clip),
                  "/text": (200, {"Content-Type": "text/plain"}, b"+OK redis ready"),
                  "/empty": (200, {}, b""), "/big": (200, {}, b"\0" * 60_000),
                  "/port": (302, {"Location": f"http://127.0.0.1:{other}/x.png"}, b""),
                  "/ftp": (302, {"Location": f"ftp://127.0.0.1:{other}/x.png"}, b"")}
        with http_server(routes) as (port, _):
            base = f"http://127.0.0.1:{port}"
            assert fetch(base + "/x.png", "p", lax).data == png()
            assert fetch(base + "/clip.mp4", "p", MediaPolicy(allow_remote=True, allow_private_hosts=True)).data == clip
            failures = [(base + "/x.png", strict)] + [(base + p, lax) for p in (
                "/missing", "/text", "/empty", "/big", "/port", "/ftp")] + [
                (f"http://127.0.0.1:{closed_port()}/x.png", lax), (f"http://127.0.0.1:{slow}/x.png", lax)]
            bodies = []
            with logged_by("mlx_internvl.server.media") as logged:
                for url, policy in failures:
                    with pytest.raises(APIError) as e:
                        fetch(url, "p", policy)
                    bodies.append((e.value.status, e.value.body()))
    assert all(b == bodies[0] for b in bodies), bodies
    assert bodies[0][0] == 400 and bodies[0][1]["error"]["code"] == "image_download_failed"
    logged = "\n".join(logged)
    assert "HTTP 404" in logged and "not a public address" in logged and "deadline" in logged
    assert "Traceback" not in logged


def test_one_fetcher():
    """Nothing but `mlx_internvl/fetch.py` speaks HTTP itself (a second fetch loop would miss these rules)."""
    import ast

    root = Path(__file__).resolve().parent.parent
    clients = {"urllib.request", "http.client", "httpx", "requests", "urllib3", "aiohttp"}
    found = []
    for f in sorted([*(root / "mlx_internvl").rglob("*.py"), *(root / "cli").rglob("*.py")]):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                if isinstance(node, ast.ImportFrom) and node.module else [])
            found += [(f.relative_to(root).as_posix(), n) for n in names if n in clients]
    assert found == [("mlx_internvl/fetch.py", "http.client")]


def test_serve_refuses_the_private_option_alone(capsys):
    pytest.importorskip("fastapi")
    from mlx_internvl.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "/nonexistent", "--allow-private-image-hosts"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "--allow-private-image-hosts only widens --allow-remote-images" in err, err
    assert "Traceback" not in err


def test_open_image_fetches_through_the_same_rules():
    """The library and CLI (`open_image`): a URL the user named may be on loopback; a redirect from it to another
    port may not, and the user is told why."""
    from mlx_internvl.errors import UserError
    from mlx_internvl.images import open_image

    with http_server({"/x.png": (200, {}, png())}) as (other, other_seen):
        routes = {"/x.png": (200, {}, png()), "/away": (302, {"Location": f"http://127.0.0.1:{other}/x.png"}, b"")}
        with http_server(routes) as (port, _):
            assert open_image(f"http://localhost:{port}/x.png").size == (8, 6)
            with pytest.raises(UserError, match="cannot be downloaded .*127.0.0.1, which is not a public address"):
                open_image(f"http://127.0.0.1:{port}/away")
    assert other_seen == []

"""Remote image fetching: public addresses only (every hop), byte and time limits.

A loopback HTTP server stands in for the internet; tests that need to reach it swap the
address policy, everything else runs with the real one.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from epd.inputs.errors import InvalidInputError
from epd.inputs.image import load_image
from epd.server.fetch import RemoteMediaFetcher, is_public_address
from epd.testing.images import noise_image

from .helpers import encode_image

PNG = encode_image(noise_image(30, 20, seed=4), "PNG")
LOOPBACK = ipaddress.ip_address("127.0.0.1")
STALL_S = 30.0  # how long the slow routes would hold a client that had no deadline
RELEASE = threading.Event()  # set at teardown: the slow routes stop holding


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        Handler.hits.append(self.path)
        route = {
            "/ok.png": self._ok, "/missing": lambda: self._status(404), "/big": self._big,
            "/unsized": self._unsized, "/slow": self._slow, "/trickle": self._trickle,
            "/loop": lambda: self._redirect("/loop"), "/to-ok": lambda: self._redirect("/ok.png"),
            "/to-private": lambda: self._redirect("http://10.1.2.3/x.png"),
            "/to-nowhere": lambda: self._status(302),
        }.get(self.path, lambda: self._status(404))  # fmt: skip
        route()

    def _ok(self) -> None:
        self._send(200, PNG)

    def _big(self) -> None:
        self._send(200, b"\x89PNG" + b"\x00" * 5000)

    def _unsized(self) -> None:  # no Content-Length: the body ends when the connection closes
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"\x00" * 5000)
        self.close_connection = True

    def _slow(self) -> None:
        RELEASE.wait(STALL_S)
        self._send(200, PNG)

    def _trickle(self) -> None:  # a byte every 0.1 s: no single read ever times out
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        for _ in range(int(STALL_S / 0.1)):
            self.wfile.write(b"\x00")
            self.wfile.flush()
            if RELEASE.wait(0.1):
                return

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _status(self, code: int) -> None:
        self._send(code, b"")

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that give up (the point of the deadline tests) break the pipe


@pytest.fixture(scope="module")
def origin() -> Iterator[str]:
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    RELEASE.set()
    httpd.shutdown()


def loopback_only(ip) -> bool:
    return ip == LOOPBACK


FETCH = RemoteMediaFetcher(timeout_s=1.0, allow_address=loopback_only)


@pytest.mark.parametrize(
    "address, public",
    [("8.8.8.8", True), ("2001:4860:4860::8888", True), ("127.0.0.1", False), ("10.0.0.1", False),
     ("172.16.5.4", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
     ("0.0.0.0", False), ("224.0.0.1", False), ("255.255.255.255", False), ("::1", False), ("fe80::1", False),
     ("fc00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("::", False)],
)  # fmt: skip
def test_public_address_policy(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "[::ffff:127.0.0.1]", "169.254.169.254"])
def test_default_policy_refuses_before_connecting(origin, host):
    Handler.hits.clear()
    port = origin.rsplit(":", 1)[1]
    with pytest.raises(InvalidInputError, match="non-public"):
        RemoteMediaFetcher(timeout_s=1.0)(f"http://{host}:{port}/ok.png")
    assert Handler.hits == []


def test_fetches_an_image(origin):
    assert FETCH(origin + "/ok.png") == PNG
    assert FETCH(origin + "/to-ok") == PNG  # a redirect to an allowed address is followed
    img = load_image(origin + "/ok.png", fetch_remote=FETCH)
    assert img.size == (30, 20) and img.mode == "RGB"


def test_redirect_to_a_private_address_is_refused(origin):
    with pytest.raises(InvalidInputError, match="non-public"):
        FETCH(origin + "/to-private")


@pytest.mark.parametrize(
    "path, message",
    [("/missing", "HTTP 404"), ("/loop", "redirected more than"), ("/to-nowhere", "without a Location"),
     ("/big", "too large"), ("/unsized", "too large")],
)  # fmt: skip
def test_failures_are_input_errors(origin, path, message):
    with pytest.raises(InvalidInputError, match=message):
        FETCH(origin + path, max_bytes=1000)


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
def test_deadline_bounds_the_whole_fetch(origin, path):
    started = time.monotonic()
    with pytest.raises(InvalidInputError, match="timed out"):
        FETCH(origin + path)  # its deadline is 1 s; the server would hold it for STALL_S
    assert time.monotonic() - started < STALL_S / 3


def test_without_a_fetcher_remote_urls_are_refused(origin):
    with pytest.raises(InvalidInputError, match="not enabled"):
        load_image(origin + "/ok.png")


def test_unusable_urls(origin):
    for url in ("http:///nohost.png", "http://no-such-host.invalid/x.png"):
        with pytest.raises(InvalidInputError):
            FETCH(url)

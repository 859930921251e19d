"""Large request bodies passed past h11 (epd.server.connections, epd.server.h11_body): the app
gets the same bytes as through h11, and the connection goes on as before (keep-alive,
pipelining, a client that leaves mid-body).

A real uvicorn server with the server's protocol class, in a thread, in front of a small ASGI
app that answers with what it received; the client is a plain socket, to send exactly the bytes
each case needs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import threading
from collections.abc import Iterator

import h11
import pytest
import uvicorn

from epd.server.connections import header_timeout_protocol
from epd.server.h11_body import content_length_left, end_content_length

LARGE = (4 << 20) + 12345  # several socket reads past the first (asyncio: 256 KiB), odd-sized
TIMEOUT_S = 30.0


class _Recorder:
    """The ASGI app: answers each request with its body's length and sha256; remembers
    every request's outcome, a client gone mid-body included."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.changed = threading.Condition()

    async def __call__(self, scope: dict, receive, send) -> None:  # noqa: ANN001 - ASGI callables
        if scope["type"] != "http":
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._record("disconnected")
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        self._record(f"{len(body)}:{hashlib.sha256(body).hexdigest()}")
        answer = json.dumps({"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    def _record(self, outcome: str) -> None:
        with self.changed:
            self.outcomes.append(outcome)
            self.changed.notify_all()

    def wait_for(self, count: int) -> list[str]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.outcomes) >= count, TIMEOUT_S), self.outcomes
            return list(self.outcomes)


class _Served:
    def __init__(self, port: int, app: _Recorder, bypassed: list[int]) -> None:
        self.port, self.app, self.bypassed = port, app, bypassed


# The event loops uvicorn may run on (uvloop wherever it is installed). Both read into the
# buffers of the protocol the transport sees (epd.server.connections._BufferedReads); uvloop
# would hand a protocol that is also an asyncio.Protocol its reads as bytes instead.
LOOPS = [
    "asyncio",
    pytest.param(
        "uvloop",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"
        ),
    ),
]


@pytest.fixture(params=LOOPS)
def served(request: pytest.FixtureRequest) -> Iterator[_Served]:
    app, bypassed = _Recorder(), []

    class Protocol(header_timeout_protocol(TIMEOUT_S, lambda: None)):
        def _body_filled(self, nbytes: int) -> None:  # counts what took the bypass
            bypassed.append(nbytes)
            super()._body_filled(nbytes)

    config = uvicorn.Config(app, host="127.0.0.1", port=0, http=Protocol, lifespan="off", loop=request.param)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:  # a state, polled: uvicorn has no event for it
        assert thread.is_alive(), "uvicorn exited before it started"
        threading.Event().wait(0.01)
    yield _Served(server.servers[0].sockets[0].getsockname()[1], app, bypassed)
    server.should_exit = True
    thread.join(TIMEOUT_S)


def _request(body: bytes, path: str = "/") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-length: {len(body)}\r\n\r\n".encode()
    return head + body


class _Responses:
    """Responses read off one connection, in order (pipelined ones included)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.data = sock, b""

    def next(self) -> dict:
        while b"\r\n\r\n" not in self.data:
            self._more()
        head, _, self.data = self.data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        fields = dict(line.partition(b":")[::2] for line in head.split(b"\r\n")[1:])
        length = int({k.strip().lower(): v for k, v in fields.items()}[b"content-length"])
        while len(self.data) < length:
            self._more()
        body, self.data = self.data[:length], self.data[length:]
        return json.loads(body)

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, "the server closed the connection"
        self.data += chunk


def _expected(body: bytes) -> dict:
    return {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)


def test_large_bodies_arrive_whole_on_a_kept_alive_connection(served: _Served) -> None:
    bodies = [os.urandom(LARGE), b"small", os.urandom(LARGE + 1)]
    with _connect(served.port) as sock:
        responses = _Responses(sock)
        for body in bodies:
            sock.sendall(_request(body))
            assert responses.next() == _expected(body)
    assert sum(served.bypassed) > LARGE  # most of both large bodies went past h11


def test_a_request_pipelined_behind_a_large_body_is_answered(served: _Served) -> None:
    first, second, third = os.urandom(LARGE), b'{"x": 1}', os.urandom(LARGE)
    with _connect(served.port) as sock:
        sock.sendall(_request(first) + _request(second) + _request(third))  # one write: reads mix them
        responses = _Responses(sock)
        assert [responses.next() for _ in range(3)] == [_expected(b) for b in (first, second, third)]
    assert served.bypassed


def test_a_large_body_sent_in_small_pieces_arrives_whole(served: _Served) -> None:
    body = os.urandom(LARGE)
    request = _request(body)
    with _connect(served.port) as sock:
        for start in range(0, len(request), 4093):  # the head split too
            sock.sendall(request[start : start + 4093])
        assert _Responses(sock).next() == _expected(body)
    assert served.bypassed


def test_a_client_that_leaves_mid_body_is_seen_as_gone(served: _Served) -> None:
    request = _request(os.urandom(LARGE))
    with _connect(served.port) as sock:
        sock.sendall(request[: len(request) // 2])
    assert served.app.wait_for(1) == ["disconnected"]
    body = os.urandom(LARGE)  # and the server still serves others
    with _connect(served.port) as sock:
        sock.sendall(_request(body))
        assert _Responses(sock).next() == _expected(body)


def test_h11_reads_content_length_bodies_as_the_bypass_expects() -> None:
    """If a new h11 keeps its body state elsewhere, this fails: large bodies would silently
    take the slow path again (epd.server.h11_body)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(_request(b"x" * 100)[:-60])
    assert isinstance(conn.next_event(), h11.Request)
    assert isinstance(conn.next_event(), h11.Data)  # the 40 bytes that came with the head
    assert conn.next_event() is h11.NEED_DATA
    assert content_length_left(conn) == 60
    assert end_content_length(conn)
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    assert content_length_left(conn) is None  # their side is done


def test_chunked_bodies_are_left_to_h11() -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Request)
    assert conn.next_event() is h11.NEED_DATA
    assert content_length_left(conn) is None
    assert not end_content_length(conn)


def test_bytes_h11_holds_unread_keep_the_body_on_h11s_path() -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(_request(b"y" * 10))
    assert isinstance(conn.next_event(), h11.Request)  # the body sits in h11's buffer, unread
    assert content_length_left(conn) is None

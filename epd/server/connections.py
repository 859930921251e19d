"""HTTP/1.1 connections: uvicorn's h11 protocol plus a read timeout for request headers, and
large bodies passed to the app as the socket delivers them.

uvicorn closes idle keep-alive connections, but a client that sends part of its headers and
then nothing held its connection, unanswered, for as long as it liked. Here a request's
headers must be complete within --header-read-timeout seconds of the connection opening, or
of the first byte of a later request on a kept-alive connection (until that byte, uvicorn's
keep-alive timeout governs); else the client gets a 408 with an OpenAI error body and the
connection closes:

    connect ... "POST / HTTP/1.1\\r\\nHost:" ... (timeout) -> 408, close
    connect ... headers complete --------------------------> the app (body timeout: epd.server.body)

The request is unknown at that point, so the answer is written here, not by the app.

A body of a known length (Content-Length) past DIRECT_BODY_MIN_BYTES skips h11 once its
headers are parsed: each chunk read from the socket goes to the app as it is. Through h11 and
uvicorn, each byte of a body was copied five more times (into h11's buffer, two slices of it,
uvicorn's buffer, its `bytes()`): ~5 ms of CPU for a 15 MB body of three images (BENCHMARKS.md,
"Pixels off the front end"). h11 still parses every request line and header, and learns where
the body ends (epd.server.h11_body), so keep-alive, pipelining and responses are unchanged:

    headers (h11) -> body chunks -> app, counted down ... 0 -> h11: EndOfMessage -> next request
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.h11_impl import H11Protocol

from epd.server.errors import APIError
from epd.server.h11_body import content_length_left, end_content_length

DIRECT_BODY_MIN_BYTES = 1 << 16  # smaller bodies take h11's path: a copy or two costs nothing there
# Socket reads while passing a body: asyncio reads 256 KiB at a time, and each read is a round
# of the loop (pause, wake the app, resume); 1 MiB ones cut ~3 ms of a 15 MB body's ~10.
DIRECT_BODY_READ_BYTES = 1 << 20


def header_timeout_protocol(timeout_s: float, on_timeout: Callable[[], None]) -> type[asyncio.Protocol]:
    """uvicorn's `http` protocol class with headers due within `timeout_s`; `on_timeout` counts them."""
    attributes = {"header_timeout_s": timeout_s, "on_header_timeout": staticmethod(on_timeout)}
    return type("H11WithHeaderTimeout", (_HeaderTimeoutProtocol,), attributes)


class _HeaderTimeoutProtocol(H11Protocol):
    header_timeout_s: float = 30.0
    on_header_timeout: Callable[[], None] = staticmethod(lambda: None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_left = 0  # bytes of the current body still to pass to the app past h11

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._body_left:
            data = self._pass_body(data)
            if not data:
                return
        super().data_received(data)
        if self._waiting_for_headers():
            self._start_header_timer()  # a no-op while it runs: the deadline is from the start
        else:
            self._stop_header_timer()
        if self.cycle is not None and not self.transport.is_closing():
            left = content_length_left(self.conn)
            if left is not None and left >= DIRECT_BODY_MIN_BYTES:
                self._body_left = left
                _set_read_size(self.transport, DIRECT_BODY_READ_BYTES)

    def _pass_body(self, data: bytes) -> bytes:
        """Hand the body's part of `data` to the app; return what follows it (a pipelined request)."""
        body = data if len(data) <= self._body_left else data[: self._body_left]
        self._body_left -= len(body)
        self._to_app(body)
        if not self._body_left:
            _set_read_size(self.transport, None)
            end_content_length(self.conn)
            self.handle_events()  # h11's EndOfMessage: the app's last message, or the next cycle
        return data[len(body) :] if len(body) < len(data) else b""

    def _to_app(self, chunk: bytes) -> None:
        """What uvicorn does with h11's Data events, minus the copies: uvicorn hands the app
        `bytes(cycle.body)`, which is `chunk` itself when nothing else waits."""
        cycle = self.cycle
        if cycle is None or self.conn.our_state is h11.DONE:
            return  # answered already (413, 503...): the rest of the body is dropped, as uvicorn does
        cycle.body = cycle.body + chunk if cycle.body else chunk
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()  # until the app asks for more, as uvicorn does
        cycle.message_event.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _waiting_for_headers(self) -> bool:
        return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

    def _start_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if not self._waiting_for_headers():
            return
        self.on_header_timeout()
        self.transport.write(_timeout_response(self.header_timeout_s))
        self.transport.close()


def _set_read_size(transport: asyncio.BaseTransport, size: int | None) -> None:
    """Read `size` bytes at a time from now on (None: the transport's default). asyncio's socket
    transport reads `max_size` bytes a time; another loop's transport (uvloop) keeps its own."""
    if size is None:
        getattr(transport, "__dict__", {}).pop("max_size", None)  # the class's value shows again
    elif hasattr(transport, "max_size"):
        transport.max_size = size


def _timeout_response(timeout_s: float) -> bytes:
    error = APIError(
        408, f"the request headers were not received within {timeout_s:g} s", code="request_timeout"
    )
    body = json.dumps(error.body()).encode()
    head = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    )
    return head + body

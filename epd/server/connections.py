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

A body of a known length (Content-Length) from DIRECT_BODY_MIN_BYTES to the largest allowed
skips h11 once its headers are parsed: the socket reads land in one buffer of the body's size
(asyncio's BufferedProtocol: `recv_into`), whose filled slices the app receives as they come
(epd.server.direct_body). Through h11 and uvicorn, each byte of a body was copied five more
times (into h11's buffer, two slices of it, uvicorn's buffer, its `bytes()`): ~5 ms of CPU for
a 15 MB body of three images (BENCHMARKS.md, "Pixels off the front end"); into fresh `bytes`
per read, then joined, still ~2.5 ms. h11 still parses every request line and header, and
learns where the body ends (epd.server.h11_body), so keep-alive, pipelining and responses are
unchanged:

    headers (h11) -> body buffer, filled read by read -> app (slices) ... full
                  -> h11: EndOfMessage -> next request

Outside such bodies (headers, small bodies) a read lands in a scratch buffer and is copied out
to h11 as uvicorn's own path would have it (a few KiB: nothing worth a second path).

The transport sees the connection through `_BufferedReads`, a BufferedProtocol and nothing
else: uvloop reads into a protocol's buffers only if it is not also an asyncio.Protocol, as
uvicorn's is, and otherwise hands over each read as new `bytes` (copied once more into the body's
buffer: two copies of every body byte, 6.5% of the API process's CPU on image requests).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import h11
from uvicorn._types import ASGIReceiveEvent
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from epd.server.direct_body import BufferBudget, DirectBody
from epd.server.errors import APIError
from epd.server.h11_body import content_length_left, end_content_length

DIRECT_BODY_MIN_BYTES = 1 << 16  # smaller bodies take h11's path: a copy or two costs nothing there
SCRATCH_READ_BYTES = 1 << 16  # reads outside direct bodies (asyncio's own are 256 KiB)
# Filled bytes of a direct body the app has not taken, past which reading pauses until it asks
# (uvicorn pauses at 64 KiB): what the body budget (epd.server.body) has not counted yet stays
# under this per connection, and a body taken as it comes never pauses.
DIRECT_BODY_HIGH_WATER_BYTES = 4 << 20
_UNBOUNDED = 1 << 62


def header_timeout_protocol(
    timeout_s: float,
    on_timeout: Callable[[], None],
    max_body_bytes: int = _UNBOUNDED,
    max_buffered_bytes: int = _UNBOUNDED,
) -> type[asyncio.Protocol]:
    """uvicorn's `http` protocol class with headers due within `timeout_s` (`on_timeout` counts
    them), and bodies of up to `max_body_bytes` read into one buffer each while their buffers,
    all connections together, stay within `max_buffered_bytes` (epd.server.direct_body.BufferBudget;
    larger bodies are the app's to refuse: no buffer is made for them)."""
    attributes = {
        "header_timeout_s": timeout_s,
        "on_header_timeout": staticmethod(on_timeout),
        "max_direct_body_bytes": max_body_bytes,
        "body_buffers": BufferBudget(max_buffered_bytes),
    }
    return type("H11WithHeaderTimeout", (_HeaderTimeoutProtocol,), attributes)


class _HeaderTimeoutProtocol(H11Protocol):
    header_timeout_s: float = 30.0
    on_header_timeout: Callable[[], None] = staticmethod(lambda: None)
    max_direct_body_bytes: int = _UNBOUNDED
    body_buffers: BufferBudget = BufferBudget(_UNBOUNDED)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body: DirectBody | None = None  # the body being read past h11, if any
        self._scratch = memoryview(bytearray(SCRATCH_READ_BYTES))

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        transport.set_protocol(_BufferedReads(self))  # before the transport starts reading
        self._start_header_timer()

    # What the transport calls through `_BufferedReads`: it reads into the buffer given here
    def get_buffer(self, sizehint: int) -> memoryview:
        return self._body.free_space() if self._body is not None else self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._body is None:
            self.data_received(bytes(self._scratch[:nbytes]))
        else:
            self._body_filled(nbytes)

    def data_received(self, data: bytes) -> None:
        """What was read outside a direct body (from `buffer_updated`): h11's to parse."""
        cycle_before = self.cycle
        super().data_received(data)
        if self._waiting_for_headers():
            self._start_header_timer()  # a no-op while it runs: the deadline is from the start
        else:
            self._stop_header_timer()
        if self.cycle is not cycle_before and self.cycle is not None and not self.transport.is_closing():
            self._start_direct_body(self.cycle)

    def _start_direct_body(self, cycle: RequestResponseCycle) -> None:
        """Read the rest of `cycle`'s body into one buffer, if it is large and of a known length.
        Only for a cycle that began in this read: its app has not started, so it will call the
        `receive` set here (uvicorn's own would hand it none of the buffer)."""
        left = content_length_left(self.conn)
        if left is None or left < DIRECT_BODY_MIN_BYTES:
            return
        size = len(cycle.body) + left
        if size > self.max_direct_body_bytes:
            return  # the app refuses it by its Content-Length (413): no buffer is made for it
        if not self.body_buffers.take(size):
            return  # buffers for enough bodies exist already: this one comes through h11
        body = self._body = DirectBody(cycle.body, left)  # the bytes h11 passed with the head first
        cycle.body = bytearray()
        cycle.receive = _direct_receive(cycle.receive, body)  # type: ignore[method-assign]

    def _body_filled(self, nbytes: int) -> None:
        body, cycle = self._body, self.cycle
        assert body is not None
        body.filled_by(nbytes)
        if body.complete:
            self._body = None
            self.body_buffers.give_back(body.size)
            end_content_length(self.conn)
            self.handle_events()  # h11's EndOfMessage: the app's last message, or the next cycle
            return
        if cycle is None or self.conn.our_state is h11.DONE:
            return  # answered already (413, 503...): the rest of the body is dropped, as uvicorn does
        if body.unread > DIRECT_BODY_HIGH_WATER_BYTES:
            self.flow.pause_reading()  # until the app asks for more (uvicorn's receive resumes)
        cycle.message_event.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        if self._body is not None:  # gone mid-body
            self.body_buffers.give_back(self._body.size)
            self._body = None
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


class _BufferedReads(asyncio.BufferedProtocol):
    """What the transport calls: every callback goes to the connection's HTTP protocol."""

    def __init__(self, http: _HeaderTimeoutProtocol) -> None:
        self.http = http

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.http.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.http.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        return self.http.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.http.connection_lost(exc)

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()


def _direct_receive(
    receive: Callable[[], Awaitable[ASGIReceiveEvent]], body: DirectBody
) -> Callable[[], Awaitable[ASGIReceiveEvent]]:
    """uvicorn's `receive` for a cycle whose body is read into `body`: its messages as uvicorn
    makes them (disconnects, 100-continue, `more_body`), each body the slice filled since the
    last one."""

    async def receive_direct() -> ASGIReceiveEvent:
        message = await receive()
        if message["type"] == "http.request":
            message["body"] = body.take()  # type: ignore[typeddict-item]
        return message

    return receive_direct


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

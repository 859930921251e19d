"""A large body read into one buffer (epd.server.direct_body, epd.server.connections): the app
gets slices of it that make up the body, then the buffer itself as the body (no join); reading
pauses while the app leaves megabytes untaken; a body past the largest allowed takes h11's path.

The protocol is driven by hand, as asyncio's transport drives a BufferedProtocol (`get_buffer`,
the bytes written into it, `buffer_updated`), over a transport that only records; the app runs
on the same loop, so each step is seen in order, without sockets or waiting on time.
"""

from __future__ import annotations

import asyncio
import os

import uvicorn
from uvicorn.server import ServerState

from epd.server.connections import DIRECT_BODY_HIGH_WATER_BYTES, header_timeout_protocol
from epd.server.direct_body import DirectBody, unzeroed_bytearray, whole_body

BODY = os.urandom(DIRECT_BODY_HIGH_WATER_BYTES + (3 << 20) + 12345)


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = self.closing = False
        self.written = b""

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closing = True

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol


class _App:
    """Takes the body once `go` is set; keeps the chunks as they came."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.chunks: list[bytes | memoryview] = []
        self.done = asyncio.Event()

    async def __call__(self, scope: dict, receive, send) -> None:  # noqa: ANN001 - ASGI callables
        await self.go.wait()
        more = True
        while more:
            message = await receive()
            self.chunks.append(message["body"])
            more = message["more_body"]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        self.done.set()


def _protocol(
    app: _App, max_body_bytes: int = 1 << 62, max_buffered_bytes: int = 1 << 62
) -> tuple[asyncio.BufferedProtocol, _Transport]:
    cls = header_timeout_protocol(30.0, lambda: None, max_body_bytes, max_buffered_bytes)
    protocol = cls(config=uvicorn.Config(app, lifespan="off"), server_state=ServerState(), app_state={})
    transport = _Transport()
    protocol.connection_made(transport)
    # What a transport calls from then on: a BufferedProtocol only (uvloop hands any
    # asyncio.Protocol new bytes instead of reading into its buffers).
    assert isinstance(transport.protocol, asyncio.BufferedProtocol)
    assert not isinstance(transport.protocol, asyncio.Protocol)
    return transport.protocol, transport


def _feed(protocol: asyncio.BufferedProtocol, data: bytes) -> int:
    """One socket read of (up to) `data`, as asyncio makes it; the bytes read."""
    buffer = protocol.get_buffer(-1)
    n = min(len(buffer), len(data))
    buffer[:n] = data[:n]
    protocol.buffer_updated(n)
    return n


def _head(length: int) -> bytes:
    return f"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: {length}\r\n\r\n".encode()


def test_the_app_gets_the_buffer_itself_and_reading_pauses_while_it_waits() -> None:
    async def scenario() -> None:
        app = _App()
        protocol, transport = _protocol(app)
        sent = _head(len(BODY)) + BODY
        offset = _feed(protocol, sent)  # the head, and the body's first bytes through h11
        assert len(protocol.get_buffer(-1)) == len(sent) - offset  # the rest of the body, no more
        while not transport.paused:  # the app takes nothing yet
            offset += _feed(protocol, sent[offset : offset + (1 << 20)])
        assert DIRECT_BODY_HIGH_WATER_BYTES < offset < len(sent)
        app.go.set()
        while offset < len(sent):
            await asyncio.sleep(0)  # the app takes what is there, which resumes reading
            assert not transport.paused
            offset += _feed(protocol, sent[offset : offset + (1 << 20)])
        await asyncio.wait_for(app.done.wait(), 30)
        assert all(isinstance(chunk, memoryview) for chunk in app.chunks) and len(app.chunks) > 1
        body = whole_body(app.chunks, len(BODY))
        assert isinstance(body, bytearray) and body == BODY
        assert transport.written.startswith(b"HTTP/1.1 200")

    asyncio.run(scenario())


def test_a_body_past_the_largest_allowed_takes_h11s_path() -> None:
    _takes_h11s_path(max_body_bytes=len(BODY) - 1)


def test_a_body_past_the_buffers_allowed_at_once_takes_h11s_path() -> None:
    _takes_h11s_path(max_buffered_bytes=len(BODY) - 1)


def _takes_h11s_path(**limits: int) -> None:
    async def scenario() -> None:
        app = _App()
        app.go.set()
        protocol, transport = _protocol(app, **limits)
        sent = _head(len(BODY)) + BODY
        offset = _feed(protocol, sent)
        assert len(protocol.get_buffer(-1)) < len(sent) - offset  # a scratch buffer: no body buffer
        while offset < len(sent):
            await asyncio.sleep(0)
            offset += _feed(protocol, sent[offset:])
        await asyncio.wait_for(app.done.wait(), 30)
        assert whole_body(app.chunks, len(BODY)) is None and b"".join(app.chunks) == BODY

    asyncio.run(scenario())


def test_buffers_are_counted_until_their_body_is_in_or_its_client_gone() -> None:
    async def scenario() -> None:
        app = _App()
        app.go.set()
        protocol, _ = _protocol(app, max_buffered_bytes=2 * len(BODY))
        budget = protocol.http.body_buffers
        sent = _head(len(BODY)) + BODY
        offset = _feed(protocol, sent)
        assert budget.used == len(BODY)
        while offset < len(sent):
            await asyncio.sleep(0)
            offset += _feed(protocol, sent[offset:])
        assert budget.used == 0
        await asyncio.wait_for(app.done.wait(), 30)
        _feed(protocol, sent[: len(sent) // 2])  # the next request, cut off by its client
        assert budget.used == len(BODY)
        protocol.connection_lost(None)
        assert budget.used == 0

    asyncio.run(scenario())


def test_whole_body_is_only_all_of_one_buffer() -> None:
    body = DirectBody(b"head", 6)
    body.free_space()[:6] = b"123456"
    body.filled_by(6)
    taken = body.take()
    assert body.complete and bytes(taken) == b"head123456" and body.take() == b""
    assert whole_body([taken], 10) is taken.obj
    assert whole_body([taken[:4], taken[4:]], 10) is taken.obj
    assert whole_body([taken[:4]], 4) is None  # part of a buffer
    assert whole_body([bytes(taken)], 10) is None  # not a slice of one
    assert whole_body([taken[:4], b"123456"], 10) is None
    assert whole_body([], 0) is None


def test_unzeroed_bytearray_has_the_size_asked() -> None:
    assert [len(unzeroed_bytearray(n)) for n in (0, 1, 1 << 20)] == [0, 1, 1 << 20]
    assert isinstance(unzeroed_bytearray(3), bytearray)

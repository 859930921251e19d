"""HTTP/1.1 connections: uvicorn's h11 protocol plus a read timeout for request headers.

uvicorn closes idle keep-alive connections, but a client that sends part of its headers and
then nothing held its connection, unanswered, for as long as it liked. Here a request's
headers must be complete within --header-read-timeout seconds of the connection opening, or
of the first byte of a later request on a kept-alive connection (until that byte, uvicorn's
keep-alive timeout governs); else the client gets a 408 with an OpenAI error body and the
connection closes:

    connect ... "POST / HTTP/1.1\\r\\nHost:" ... (timeout) -> 408, close
    connect ... headers complete --------------------------> the app (body timeout: epd.server.body)

The request is unknown at that point, so the answer is written here, not by the app.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from epd.server.errors import APIError


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

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_headers():
            self._start_header_timer()  # a no-op while it runs: the deadline is from the start
        else:
            self._stop_header_timer()

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

"""A request body: read within limits of size, time and memory, then parsed.

    Content-Length over --max-request-bytes ............................ 413 at once
    each chunk: none for --body-read-timeout s ......................... 408
                the body past --max-request-bytes ...................... 413
                all bodies being read past --max-buffered-request-bytes  503, Retry-After
    complete -> shape limits (epd.server.shape) -> pydantic -> the request model

The budget holds a body's bytes from its first chunk until it is parsed. Reading comes
before admission (--max-queued-requests counts parsed requests), so without it ten clients
each sending 30 of 32 MiB held 300 MiB. A body over the budget is refused with 503 and
Retry-After, as proxies shed load (nginx's limit_conn, envoy's buffer overload action),
rather than queued: a waiting upload would hold its connection and its bytes anyway.
Each refusal closes the connection (`Connection: close`): the rest of the body is not read.

The timeout is between chunks (as nginx's client_body_timeout): a slow but steady upload
passes, a stalled one is answered. Headers have their own timeout (epd.server.connections).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import Request
from prometheus_client import CollectorRegistry, Gauge
from pydantic import BaseModel, ValidationError
from starlette.types import Message

from epd.inputs.image import DataURL
from epd.server.blobs import QuoteIndex, lift_data_urls
from epd.server.direct_body import whole_body
from epd.server.errors import APIError, ClientGone, ShuttingDown, from_validation_error
from epd.server.shape import ObjectShape, check_shape
from epd.server.state import ServerState

M = TypeVar("M", bound=BaseModel)
CLOSE = {"Connection": "close"}
LARGE_BODY_BYTES = 1 << 20  # past this, parsing steps let other requests run in between


class BodyBudget:
    """Bytes of request bodies read and not yet parsed, across all connections."""

    def __init__(self, limit: int, retry_after_s: int, registry: CollectorRegistry) -> None:
        self.limit, self.retry_after_s = limit, retry_after_s
        self.used = 0
        Gauge(
            "epd_request_body_bytes_buffered",
            "bytes of request bodies read and not yet parsed, all connections together",
            registry=registry,
        ).set_function(lambda: self.used)

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise APIError(
                503,
                f"the server is receiving too many request bodies at once (limit {self.limit} bytes "
                "across connections); retry later",
                code="service_unavailable",
                headers={"Retry-After": str(self.retry_after_s), **CLOSE},
            )
        self.used += n

    def give_back(self, n: int) -> None:
        self.used -= n


async def read_json(request: Request, model: type[M], shape: ObjectShape, state: ServerState) -> M:
    """The body parsed into `model`: 4xx/503 as in the module docstring, 400 if invalid."""
    async with _buffered_body(request, state) as body:
        return await _parse(body.value(), model, shape, state)


async def read_json_with_images(
    request: Request, model: type[M], shape: ObjectShape, state: ServerState
) -> tuple[M, list[DataURL]]:
    """Like `read_json`, with large base64 image URLs lifted out before parsing (epd.server.blobs):
    the model names them `epd-blob:N`, N indexing the list. They hold slices of the body, which
    the body budget stops counting once parsed, as it does the parsed strings."""
    async with _buffered_body(request, state, note_quotes=True) as body:
        rest, blobs = lift_data_urls(body.value(), body.quotes and body.quotes.positions)
        return await _parse(rest, model, shape, state), blobs


async def _parse(body: bytes | bytearray, model: type[M], shape: ObjectShape, state: ServerState) -> M:
    # Each step holds the GIL for 15-40 ms per 20 MB (a worker thread would not help: msgspec
    # and pydantic never release it), so pause in between: /health and the streams of other
    # requests wait for one step at most.
    await _yield_if_large(body)
    check_shape(body, shape, state.engine.max_model_len)
    await _yield_if_large(body)
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise from_validation_error(e) from None


@asynccontextmanager
async def _buffered_body(
    request: Request, state: ServerState, note_quotes: bool = False
) -> AsyncIterator[_Body]:
    """The whole body, its bytes counted in the budget until the block ends; `note_quotes`: where
    its quotes are, noted as each chunk comes (epd.server.blobs.QuoteIndex)."""
    config, budget = state.config, state.body_budget
    _check_declared_length(request, config.max_request_bytes)
    body = _Body(QuoteIndex() if note_quotes else None)
    drained = asyncio.ensure_future(state.drain.wait())
    try:
        more = True
        while more:
            message = await _next_message(request, config.body_read_timeout_s, drained)
            chunk = message.get("body", b"")
            if body.size + len(chunk) > config.max_request_bytes:  # chunked uploads declare no length
                raise _too_large(config.max_request_bytes)
            budget.take(len(chunk))
            body.add(chunk)
            more = message.get("more_body", False)
        yield body
    except ShuttingDown:
        state.drain.ended_requests += 1
        raise
    finally:
        drained.cancel()
        budget.give_back(body.size)


class _Body:
    """A body's chunks as they come. A large body arrives as slices of one buffer the socket
    reads filled (epd.server.direct_body): that buffer is the body, nothing is joined. Other
    bodies are joined once at the end, each byte copied once, into memory nobody zeroed first
    (`bytearray +=` grows by an eighth at a time and so copies a large body several times over);
    the join briefly holds a body twice, on the event loop, so one body at a time does."""

    def __init__(self, quotes: QuoteIndex | None = None) -> None:
        self.chunks: list[bytes | memoryview] = []
        self.size = 0
        self.quotes = quotes

    def add(self, chunk: bytes | memoryview) -> None:
        if chunk:
            self.chunks.append(chunk)
            self.size += len(chunk)
            if self.quotes is not None:
                self.quotes.add(chunk)

    def value(self) -> bytes | bytearray:
        body = whole_body(self.chunks, self.size)
        if body is None:
            body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
            body = bytes(body) if isinstance(body, memoryview) else body
        self.chunks = [body]  # the pieces go now, not when the request ends
        return body


async def _yield_if_large(body: bytes | bytearray) -> None:
    if len(body) > LARGE_BODY_BYTES:
        # Not sleep(0): one loop iteration wakes no task that a timer or a socket made ready.
        await asyncio.sleep(0.001)


async def _next_message(request: Request, timeout_s: float, drained: asyncio.Future) -> Message:
    """The next body message: 408 after `timeout_s` without one, 503 once the drain is over."""
    receiving = asyncio.ensure_future(request.receive())
    try:
        await asyncio.wait({receiving, drained}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        receiving.cancel()  # no-op when done; else nobody will read this message
    if receiving.done() and not receiving.cancelled():
        message = receiving.result()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        return message
    if drained.done():
        raise ShuttingDown()
    raise APIError(
        408,
        f"the request body stalled: no bytes for {timeout_s:g} s",
        code="request_timeout",
        headers=CLOSE,
    )


def _check_declared_length(request: Request, max_bytes: int) -> None:
    """413 if the declared Content-Length is over `max_bytes` (absent or malformed: checked as read)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise _too_large(max_bytes)


def _too_large(max_bytes: int) -> APIError:
    return APIError(
        413, f"request body is larger than {max_bytes} bytes", code="request_too_large", headers=CLOSE
    )

"""Running one generation request end to end, for every endpoint.

    read body (<= max bytes) -> parse -> admit (slot) -> process input in a thread
      -> params -> engine.generate -> first output  ....... errors so far: a plain 4xx/5xx
      -> stream:     SSE chunks ... [DONE]            ....... later errors: an SSE error event
         otherwise:  one JSON body

Cancellation is how a request stops: a client that goes away (noticed while we wait, or
by Starlette while streaming) cancels the work, which closes `engine.generate`, which
aborts the request in the engine so its KV and MM blocks return to the pool. The slot is
released on every path (`Slot.release` is idempotent).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from epd.inputs.types import ProcessedPrompt
from epd.outputs import RequestOutput
from epd.sampling_params import SamplingParams
from epd.server.errors import APIError, bad_request, from_validation_error
from epd.server.formatting import DeltaTracker, ResponseFormatter
from epd.server.metrics import RequestTiming
from epd.server.state import ServerState, Slot

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


@dataclass
class Generation:
    """One endpoint's request, ready to run."""

    request_id: str
    timing: RequestTiming
    process: Callable[[], ProcessedPrompt]  # CPU work (images, template, tokens): runs in a thread
    params: Callable[[int], SamplingParams]  # prompt length -> params; raises APIError
    formatter: ResponseFormatter
    stream: bool
    include_usage: bool


async def read_json(request: Request, model: type[M], max_bytes: int) -> M:
    """The body parsed into `model`: 413 past `max_bytes` (declared or streamed), 400 if invalid."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise _too_large(max_bytes)
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:  # chunked uploads declare no length: count as they come
                raise _too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    try:
        return model.model_validate_json(b"".join(chunks))
    except ValidationError as e:
        raise from_validation_error(e) from None


async def run_generation(request: Request, state: ServerState, gen: Generation) -> Response:
    slot = state.admission.acquire()
    try:
        first, outputs = await until_disconnected(request, _start(state, gen, slot))
    except BaseException:
        slot.release()
        raise
    if gen.stream:
        return EventStreamResponse(_events(first, outputs, gen), outputs)
    try:
        final = await until_disconnected(request, _last(first, outputs))
    finally:
        await outputs.aclose()
    return JSONResponse(gen.formatter.response(final, gen.timing))


async def _start(
    state: ServerState, gen: Generation, slot: Slot
) -> tuple[RequestOutput, AsyncGenerator[RequestOutput, None]]:
    started = time.time()
    prompt = await asyncio.to_thread(gen.process)
    params = gen.params(len(prompt.prompt_token_ids))
    gen.timing.preprocess = time.time() - started
    outputs = _tracked(state, prompt, params, gen, slot)
    # Wait for the first output here, so that errors before it are plain HTTP errors.
    try:
        first = await outputs.__anext__()
    except StopAsyncIteration:
        raise APIError(503, "the engine stopped before the request started") from None
    return first, outputs


async def _tracked(
    state: ServerState, prompt: ProcessedPrompt, params: SamplingParams, gen: Generation, slot: Slot
) -> AsyncGenerator[RequestOutput, None]:
    """The engine's outputs, with engine failures turned into APIErrors and the timing kept."""
    timing = gen.timing
    outputs = state.engine.generate(prompt, params, gen.request_id)
    try:
        async for out in outputs:
            if out.error is not None:
                raise APIError(503, f"the request failed in the engine: {out.error}")
            if timing.first_token is None and out.outputs[0].token_ids:
                timing.first_token = time.time()
            if out.finished:
                timing.finished = time.time()
                state.metrics.observe_finished(out, timing)
            yield out
    except ValueError as e:  # the engine refused the request (e.g. it can never fit the cache)
        raise bad_request(str(e)) from None
    except RuntimeError as e:  # the engine stopped or failed
        raise APIError(503, str(e)) from None
    finally:
        slot.release()  # before any await: a cancelled task may not get past the next one
        await outputs.aclose()  # aborts the request in the engine unless it finished


async def _last(first: RequestOutput, outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = first
    async for out in outputs:
        last = out
    return last


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientGone) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is stopping this handler
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.wait({task})  # let its cleanup (abort, slot release) run before we return
    raise ClientGone()


async def _disconnected(request: Request) -> None:
    # The body is fully read by now, so the only message left to receive is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(
    first: RequestOutput, outputs: AsyncGenerator[RequestOutput, None], gen: Generation
) -> AsyncGenerator[bytes, None]:
    fmt, tracker, last = gen.formatter, DeltaTracker(), first
    try:
        for chunk in fmt.opening(first):
            yield _sse(chunk)
        out: RequestOutput | None = first
        while out is not None:
            last = out
            chunk = fmt.chunk(out, tracker.advance(out), gen.timing)
            if chunk is not None:
                yield _sse(chunk)
            out = None if out.finished else await anext(outputs, None)
        if gen.include_usage:
            yield _sse(fmt.usage_chunk(last))
    except APIError as err:  # the status line is sent already: report in the stream, like OpenAI
        yield _sse(err.body())
    finally:
        await outputs.aclose()
    yield DONE


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"request body is larger than {max_bytes} bytes", code="request_too_large")


class EventStreamResponse(StreamingResponse):
    """Server-sent events whose generators are always closed, however the response ends."""

    def __init__(
        self, events: AsyncGenerator[bytes, None], outputs: AsyncGenerator[RequestOutput, None]
    ) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._generators = (events, outputs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette cancels the stream on disconnect only for ASGI < 2.4 servers; on others
            # a failed write ends it; a client gone before the first chunk may leave `events`
            # never started (closing it then does nothing). Closing `outputs` too aborts the
            # request now in every case, rather than whenever the garbage collector gets to it.
            for generator in self._generators:
                await generator.aclose()

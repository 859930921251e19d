"""Running one generation request end to end, for every endpoint.

    read body (epd.server.body) -> admit (slot) -> process input in a thread (epd.server.preprocess)
      -> params -> engine.generate -> first output  ....... errors so far: a plain 4xx/5xx
      -> stream:     SSE chunks ... [DONE]            ....... later errors: an SSE error event
         otherwise:  one JSON body

Cancellation is how a request stops: a client that goes away (noticed while we wait, or
by Starlette while streaming) cancels the work, which stops its input processing (the slot
is held until the thread has stopped) or closes `engine.generate`, which aborts the request
in the engine so its KV and MM blocks return to the pool. The slot is released on every
path (`Slot.release` is idempotent).

At shutdown, once the grace period is over (`Drain`), what still runs ends with a 503: a
waiting request as its answer, a stream as an SSE error event and then `data: [DONE]`. A
stream reads its outputs through a `_Relay` (a task of its own pumps them into a queue), so
the drain can wake a stream that waits for its next token by putting its end in that queue.
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
from starlette.types import Receive, Scope, Send

from epd.inputs.types import ProcessedPrompt
from epd.outputs import RequestOutput
from epd.sampling_params import SamplingParams
from epd.server.errors import APIError, ClientGone, ShuttingDown, bad_request, too_late
from epd.server.formatting import DeltaTracker, ResponseFormatter
from epd.server.metrics import RequestTiming
from epd.server.state import Drain, ServerState, Slot

T = TypeVar("T")
DONE = b"data: [DONE]\n\n"


@dataclass
class Generation:
    """One endpoint's request, ready to run."""

    request_id: str
    timing: RequestTiming
    process: Callable[[], ProcessedPrompt]  # CPU work (images, template, tokens): runs in a thread
    has_images: bool  # picks the worker pool (epd.server.preprocess)
    params: Callable[[int], SamplingParams]  # prompt length -> params; raises APIError
    formatter: ResponseFormatter
    stream: bool
    include_usage: bool


async def run_generation(request: Request, state: ServerState, gen: Generation) -> Response:
    slot = state.admission.acquire()
    try:
        first, outputs = await until_stopped(request, state.drain, _start(state, gen, slot))
    except BaseException:
        slot.release()
        raise
    if gen.stream:
        relay = _Relay(outputs, state.drain)
        return EventStreamResponse(_events(first, relay, gen, state.drain), relay)
    try:
        final = await until_stopped(request, state.drain, _last(first, outputs))
    finally:
        await outputs.aclose()
    return JSONResponse(gen.formatter.response(final, gen.timing))


async def _start(
    state: ServerState, gen: Generation, slot: Slot
) -> tuple[RequestOutput, AsyncGenerator[RequestOutput, None]]:
    started = time.time()
    prompt = await state.preprocessing.run(gen.process, gen.has_images)
    params = gen.params(len(prompt.prompt_token_ids))
    gen.timing.preprocess = time.time() - started
    outputs = _tracked(state, prompt, params, gen, slot)
    # Frames of a cancelled request (a client gone) can end up in garbage cycles that live until a
    # full collection: they must not hold its prompt, whose image files are shared memory.
    del prompt
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
    del prompt  # the engine has it (see _start)
    try:
        async for out in outputs:
            if out.error is not None and out.invalid_input:
                raise bad_request(out.error)  # found where the image was decoded
            if out.error is not None and out.retry_after is not None:
                state.metrics.rejected_late.inc()
                raise too_late(out.error, out.retry_after)
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


async def until_stopped(request: Request, drain: Drain, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it when the client disconnects first (ClientGone) or the
    shutdown grace period ends first (ShuttingDown)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    over = asyncio.ensure_future(drain.wait())
    try:
        await asyncio.wait({task, gone, over}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is stopping this handler
        for future in (task, gone, over):
            future.cancel()
        raise
    gone.cancel()
    over.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})  # let its cleanup (thread stop, abort, slot release) run first
    if gone.done() and not gone.cancelled():
        raise ClientGone()
    drain.ended_requests += 1
    raise ShuttingDown()


async def _disconnected(request: Request) -> None:
    # The body is fully read by now, so the only message left to receive is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Relay:
    """A stream's engine outputs, pumped into a queue by a task of their own.

    Only the pump touches the outputs generator, so closing the relay (cancelling the pump,
    which aborts the request) is safe from any task; and the drain can end a stream that
    waits for its next token by queueing ShuttingDown.
    """

    def __init__(self, outputs: AsyncGenerator[RequestOutput, None], drain: Drain) -> None:
        self._queue: asyncio.Queue[RequestOutput | Exception | None] = asyncio.Queue()
        self._drain = drain
        self._pump = asyncio.ensure_future(self._run(outputs))
        drain.open_streams.add(self)
        if drain.over:
            self.end()

    def end(self) -> None:
        self._queue.put_nowait(ShuttingDown())

    async def next(self) -> RequestOutput | None:
        """The next output; None once the outputs ended; raises their error or ShuttingDown."""
        item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    async def aclose(self) -> None:
        self._drain.open_streams.discard(self)
        self._pump.cancel()
        await asyncio.wait({self._pump})

    async def _run(self, outputs: AsyncGenerator[RequestOutput, None]) -> None:
        try:
            async for out in outputs:
                self._queue.put_nowait(out)
        except Exception as err:  # an APIError from _tracked; cancellation passes through
            self._queue.put_nowait(err)
        else:
            self._queue.put_nowait(None)


async def _events(
    first: RequestOutput, relay: _Relay, gen: Generation, drain: Drain
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
            out = None if out.finished else await relay.next()
        if gen.include_usage:
            yield _sse(fmt.usage_chunk(last))
    except APIError as err:  # the status line is sent already: report in the stream, like OpenAI
        if isinstance(err, ShuttingDown):
            drain.ended_streams += 1
        yield _sse(err.body())
    finally:
        await relay.aclose()
    yield DONE


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """Server-sent events whose generator and relay are always closed, however the response ends."""

    def __init__(self, events: AsyncGenerator[bytes, None], relay: _Relay) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._events, self._relay = events, relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette cancels the stream on disconnect only for ASGI < 2.4 servers; on others
            # a failed write ends it; a client gone before the first chunk may leave `events`
            # never started (closing it then does nothing). Closing the relay too aborts the
            # request now in every case, rather than whenever the garbage collector gets to it.
            await self._events.aclose()
            await self._relay.aclose()

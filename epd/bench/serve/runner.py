"""One run: send prepared requests at their arrival times, at most `max_concurrency` at once.

Every request is its own task that sleeps until its send time, so a slow server never delays
later arrivals (open loop); the semaphore, when given, holds requests back instead (closed
loop at an infinite rate). Latencies are measured from the send, as vLLM's bench does; the
held-back time is in the results as `sent_s - scheduled_s`. A phased run (epd.bench.serve.phases)
gives every send time itself and one semaphore per phase (`run_schedule`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import httpx

from epd.bench.serve.arrivals import arrival_offsets
from epd.bench.serve.client import PreparedRequest, RequestResult, send
from epd.bench.serve.spec import ArrivalSpec


async def run_requests(
    prepared: list[PreparedRequest],
    arrival: ArrivalSpec,
    seed: int,
    url: str,
    headers: dict[str, str],
    timeout: float,
    on_done: Callable[[RequestResult], None] = lambda r: None,
) -> tuple[list[RequestResult], float]:
    """All results (in request order) and the run's duration: first send to last answer."""
    offsets = arrival_offsets(len(prepared), arrival, seed)
    one_group, limit = [0] * len(prepared), [arrival.max_concurrency]
    return await run_schedule(prepared, offsets, one_group, limit, url, headers, timeout, on_done)


async def run_schedule(
    prepared: list[PreparedRequest],
    offsets: list[float],
    groups: list[int],
    max_concurrency: list[int | None],
    url: str,
    headers: dict[str, str],
    timeout: float,
    on_done: Callable[[RequestResult], None] = lambda r: None,
) -> tuple[list[RequestResult], float]:
    """Send each request at its offset, at most `max_concurrency[g]` of group `groups[i]` at once."""
    gates = [asyncio.Semaphore(n) if n else None for n in max_concurrency]
    # No pool limit: the arrival process, not httpx's default of 100 connections, decides the load.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"Content-Type": "application/json", **headers}
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
        t0 = time.perf_counter()

        async def one(p: PreparedRequest, offset: float, gate: asyncio.Semaphore | None) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            result = RequestResult(p.index, offset)
            async with gate if gate is not None else contextlib.nullcontext():
                await send(client, url, p, result, t0)
            on_done(result)
            return result

        results = await asyncio.gather(*(one(p, o, gates[g]) for p, o, g in zip(prepared, offsets, groups)))
        duration = time.perf_counter() - t0
    return list(results), duration

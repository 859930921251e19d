"""What every route shares: the engine, the config, metrics, admission, the media policy,
the body budget, input processing, the prompt text bound and the shutdown drain.

Admission counts requests from the moment they are admitted (body parsed and checked) to
the end of their generation, input processing included (until its thread has returned,
even for a client that left), so a burst of image-heavy requests is bounded while it is
still decoding images, not only once in the engine. Bodies being read are bounded before
that, in bytes (epd.server.body).
All of it runs on the event loop thread: plain ints, no locks.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from fastapi import Request

from epd.entrypoints.async_engine import AsyncEngine
from epd.server.config import ServerConfig
from epd.server.errors import APIError
from epd.server.media import MediaPolicy
from epd.server.metrics import ServerMetrics

if TYPE_CHECKING:  # these modules import this one
    from epd.server.body import BodyBudget
    from epd.server.preprocess import Preprocessing
    from epd.server.text_bound import TextBound


class Slot:
    """One admitted request's place. `release` is idempotent: every exit path may call it."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.count -= 1
            self._admission = None


class Admission:
    def __init__(self, limit: int | None, retry_after_s: int, healthy: Callable[[], bool]) -> None:
        self.limit, self.retry_after_s, self.healthy = limit, retry_after_s, healthy
        self.count = 0

    def acquire(self) -> Slot:
        """A slot, or 503 while an instance is down, or 429 when `limit` requests are admitted."""
        retry = {"Retry-After": str(self.retry_after_s)}
        if not self.healthy():
            raise APIError(
                503,
                "the server is not ready: an engine instance is down",
                code="service_unavailable",
                headers=retry,
            )
        if self.limit is not None and self.count >= self.limit:
            raise APIError(
                429,
                f"the server is at its limit of {self.limit} queued requests; retry later",
                code="rate_limit_exceeded",
                headers=retry,
            )
        self.count += 1
        return Slot(self)


class Endable(Protocol):
    """An open stream the drain can end (epd.server.serving._Relay)."""

    def end(self) -> None: ...


class Drain:
    """The end of the shutdown grace period: work still running then ends with a 503 (a stream
    with an error event and [DONE]) instead of being cut by uvicorn's cancellation."""

    def __init__(self) -> None:
        self._over = asyncio.Event()
        self.open_streams: set[Endable] = set()
        self.ended_streams = 0
        self.ended_requests = 0  # not streaming yet: waiting for input processing or an answer

    @property
    def over(self) -> bool:
        return self._over.is_set()

    def end_all(self) -> None:
        self._over.set()
        for stream in list(self.open_streams):
            stream.end()

    async def wait(self) -> None:
        await self._over.wait()


@dataclass
class ServerState:
    engine: AsyncEngine
    config: ServerConfig
    metrics: ServerMetrics
    admission: Admission
    media: MediaPolicy
    body_budget: BodyBudget
    preprocessing: Preprocessing
    text_bound: TextBound
    drain: Drain

    def healthy(self) -> bool:
        return engine_healthy(self.engine)

    def check_model(self, name: str | None) -> None:
        """None means the served model (OpenAI requires the field; we are lenient)."""
        served = self.config.served_model_name
        if name is not None and name != served:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {served!r}",
                param="model",
                code="model_not_found",
            )


def engine_healthy(engine: AsyncEngine) -> bool:
    """The engine loop runs and every role has a live instance (it may be degraded: some
    instances down, their work redone elsewhere, restarts under way)."""
    return engine.is_healthy()


def get_state(request: Request) -> ServerState:
    return request.app.state.epd


async def require_api_key(request: Request) -> None:
    """FastAPI dependency for /v1 routes: `Authorization: Bearer <key>` when a key is configured."""
    key = get_state(request).config.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken must not tell how much of the key was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )

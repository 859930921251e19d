"""What generation returns, in the shape of vLLM's offline API."""

from __future__ import annotations

from dataclasses import dataclass, field

from epd.lifetime import LifetimeEvent, stage_breakdown


@dataclass
class Logprob:
    """Log-probability of one token at one position (raw model distribution, before sampling knobs)."""

    logprob: float
    rank: int
    decoded_token: str | None = None


# One position's logprobs: the sampled token plus the top-k alternatives, by token id.
PositionLogprobs = dict[int, Logprob]


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.time()) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    events: list[LifetimeEvent] = field(default_factory=list)

    def breakdown(self) -> dict[str, float]:
        """Seconds per stage (encode, mm_transfer, prefill, kv_transfer, decode and their queues)."""
        return stage_breakdown(self.events)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    error: str | None = None  # set when the request failed (finish_reason "error")
    invalid_input: bool = False  # the failure is the request's own input's fault (a 400, not a 503)
    # Set when the request was refused because it cannot meet its TTFT deadline (--reject-late):
    # seconds after which a retry may be served in time (a 429 with Retry-After).
    retry_after: float | None = None

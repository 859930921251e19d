"""Per-request lifetime events: the timeline every latency breakdown is read from.

Each stage appends events as the request passes through it; the router merges the
events of all instances into the request's `RequestMetrics.events`. Times are the
`Clock.now()` of whoever recorded them (epd.clock; in production the wall clock of one host).

    ARRIVED -> [ENCODE_QUEUED -> ENCODE_START -> ENCODE_END -> MM_TRANSFER_START -> MM_TRANSFER_END]
            -> PREFILL_QUEUED -> PREFILL_START -> PREFILL_END (= first token)
            -> [KV_TRANSFER_START -> KV_TRANSFER_END] -> DECODE_START -> FINISHED
Bracketed parts exist only when the stages live on different instances (and images exist).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from epd.clock import Clock


class Event(str, enum.Enum):
    ARRIVED = "arrived"
    ENCODE_QUEUED = "encode_queued"
    ENCODE_START = "encode_start"
    ENCODE_END = "encode_end"
    MM_TRANSFER_START = "mm_transfer_start"
    MM_TRANSFER_END = "mm_transfer_end"
    PREFILL_QUEUED = "prefill_queued"
    PREFILL_START = "prefill_start"
    PREFILL_END = "prefill_end"
    KV_TRANSFER_START = "kv_transfer_start"
    KV_TRANSFER_END = "kv_transfer_end"
    DECODE_START = "decode_start"
    FINISHED = "finished"


@dataclass
class LifetimeEvent:
    event: Event
    time: float
    instance: str | None = None
    item: int | None = None  # image index, for per-image encode events

    @classmethod
    def now(
        cls, clock: Clock, event: Event, instance: str | None = None, item: int | None = None
    ) -> LifetimeEvent:
        return cls(event, clock.now(), instance, item)


# Stage -> (start event, end event). A stage's time is from its first start to its last end,
# so with several images encoded in parallel it is the critical path, not the sum. Except for the
# stages in TAIL_STAGES, which count from their last start: a request's images encoded one batch
# after another on one encoder start their transfers one batch apart, and from the first start
# "mm_transfer" held the later batches' encodes (0.16-0.24 s on 4 H200s where the bytes take
# under a millisecond). From the last start it is the transfer time the encodes did not hide;
# never below 0: an embedding that reached P before P knew the request records no end for it
# (it was not waited for), and its start, the latest, would then come after every end.
STAGES = {
    "encode_queue": (Event.ENCODE_QUEUED, Event.ENCODE_START),
    "encode": (Event.ENCODE_START, Event.ENCODE_END),
    "mm_transfer": (Event.MM_TRANSFER_START, Event.MM_TRANSFER_END),
    "prefill_queue": (Event.PREFILL_QUEUED, Event.PREFILL_START),
    "prefill": (Event.PREFILL_START, Event.PREFILL_END),
    "kv_transfer": (Event.KV_TRANSFER_START, Event.KV_TRANSFER_END),
    "decode": (Event.DECODE_START, Event.FINISHED),
}


TAIL_STAGES = frozenset({"mm_transfer"})


def stage_breakdown(events: Iterable[LifetimeEvent]) -> dict[str, float]:
    """Seconds spent in each stage that occurred (see STAGES), from a request's events."""
    first: dict[Event, float] = {}
    last: dict[Event, float] = {}
    for e in events:
        first[e.event] = min(first.get(e.event, e.time), e.time)
        last[e.event] = max(last.get(e.event, e.time), e.time)
    return {
        stage: max(0.0, last[end] - last[start]) if stage in TAIL_STAGES else last[end] - first[start]
        for stage, (start, end) in STAGES.items()
        if start in first and end in last
    }

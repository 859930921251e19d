"""The clock's time of events on a CUDA stream (epd.clock's `Clock`, read for GPU work)."""

from __future__ import annotations

import torch

from epd.clock import Clock


class DeviceClock:
    """The clock's time of events on a CUDA stream. An encode's reports wait for its event, and
    the worker sees the event only between its own launches (each tens of ms), so the time it sees
    it is late: P had the embeddings before E's ENCODE_END ("mm_transfer" came out negative, the
    encode ~0.1 s too long). Instead each event is timed against an anchor event that was recorded
    while the stream was idle and waited for at once, so its clock time is known:
    time(e) = anchor time + anchor.elapsed_time(e)."""

    def __init__(self, clock: Clock, device: torch.device) -> None:
        self.clock, self.device = clock, device
        self.anchor: torch.cuda.Event | None = None
        self.anchor_time = 0.0

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def anchor_now(self) -> None:
        """Call with nothing of ours queued on the stream: the wait is then a few microseconds."""
        self.anchor = self.mark()
        self.anchor.synchronize()
        self.anchor_time = self.clock.now()

    def time_of(self, event: torch.cuda.Event) -> float:
        """The clock's time when `event` (recorded after the anchor, and done) was reached."""
        assert self.anchor is not None
        return self.anchor_time + self.anchor.elapsed_time(event) / 1e3

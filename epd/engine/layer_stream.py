"""Layer-wise KV streaming, prefill side: each layer's KV leaves as soon as the layer has run.

A request is streamed in the step that completes its prefill (an engine that hands off never
chunks a prompt: it prefills each in one step, epd.engine.llm_engine). After layer i of that
step, every token of the request has its layer-i KV in the cache: this step's tokens were just
written, prefix-cache hits and injected (swapped-in) rows were there before. So the layer's
rows can be copied out and sent while layers i+1.. still run. What the sink hears, per
streamed request, in this order:

    send_layer(req, 0, kv_0) ... send_layer(req, L-1, kv_L-1)   during the forward
    then, after sampling, exactly one of:
      the engine's hand-off with kv=None    the first token did not end it: D decodes
      discard(req)                          it ended at its first token (EOS, stop, length)

Both happen inside the same `step`, so an abort (handled between steps) never strands parts.
Engines that do not stream get `NoLayerStreaming`, whose hooks do nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from epd.engine.model_runner import ModelRunner
from epd.engine.request import Request
from epd.engine.scheduler import ScheduledBatch


class LayerSink(Protocol):
    """Where streamed layers go (a prefill instance: to the request's decode instance)."""

    def send_layer(self, request: Request, layer: int, kv: Any) -> None:
        """One layer of the request's KV, [2, prompt_tokens, kv_heads, head_dim] (or what the
        runner's `handoff_kv_layer` gives: a tensor-parallel runner's `HeadShares`). The tensor is
        the sink's: the engine never writes into it (the copy is queued on the device's stream)."""

    def discard(self, request: Request) -> None:
        """The request finished at its first token: the layers sent for it will not be used."""


class NoLayerStreaming:
    """The engine's streamer when KV is handed off whole (or not at all)."""

    def plan(self, batch: ScheduledBatch, block_tables: list[list[int]]) -> Callable[[int], None] | None:
        return None

    def pop_streamed(self, request: Request) -> bool:
        return False

    def finished(self, request: Request) -> None:
        pass


class LayerStreamer(NoLayerStreaming):
    def __init__(self, runner: ModelRunner, sink: LayerSink) -> None:
        self.runner, self.sink = runner, sink
        self.streamed: set[str] = set()  # request ids streamed in the current step

    def plan(self, batch: ScheduledBatch, block_tables: list[list[int]]) -> Callable[[int], None] | None:
        """The per-layer hook for this step's forward, or None when no request completes its prefill."""
        targets = []
        for req, n, table in zip(batch.requests, batch.num_new_tokens, block_tables):
            if not req.output_token_ids and req.num_computed_tokens + n >= req.num_prompt_tokens:
                targets.append((req, self.runner.slots(table, 0, req.num_computed_tokens + n)))
        self.streamed = {req.request_id for req, _ in targets}
        if not targets:
            return None

        def after_layer(layer: int) -> None:
            for req, slots in targets:
                self.sink.send_layer(req, layer, self.runner.handoff_kv_layer(layer, slots))

        return after_layer

    def pop_streamed(self, request: Request) -> bool:
        """Whether the request's KV went out layer by layer this step (its hand-off then sends no KV);
        asked once per request."""
        if request.request_id not in self.streamed:
            return False
        self.streamed.discard(request.request_id)
        return True

    def finished(self, request: Request) -> None:
        """The request ended at its first token: tell the sink to drop what it streamed."""
        if self.pop_streamed(request):
            self.sink.discard(request)

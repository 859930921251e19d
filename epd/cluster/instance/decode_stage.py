"""The decode stage: continues requests whose KV a prefill instance handed off.

What arrives through the connector, per request (order and formats: epd.cluster.kv_handoff):
`kvl:` parts (streamed layers, a tensor-parallel P's head pieces) held in `KVParts`, and one `kv:`
message that completes the KV (or discards it) and starts the request in the shared engine. A part
sent again after a failed send, or from another of P's ranks, can come after its `kv:` message,
which then waits for it (`awaiting_layers`).
An abort can overtake the KV (different paths), so the stage remembers aborts of requests it has
not seen (`DroppedKV`) and drops their KV on arrival instead of decoding for nobody; likewise the
parts still due behind a `kv:` message that no longer needs them (aborted while waiting, discarded).

The same path runs the other way when a role switch drains this instance (`MigrateRequest`,
epd.cluster.router.role_switch): a running request leaves the engine between two steps and its
KV (prompt and every output but the last, whose KV the next step would write) goes to another
decode instance as a prefill's hand-off would, the last output standing for the "first token".
It continues there from its token count: no gap, no repeat, the same draws for a seeded request.

| the request here                               | migration                                  |
|------------------------------------------------|--------------------------------------------|
| running, every token but the last computed     | its KV gathered from the blocks, sent      |
| waiting with its KV held (`kv_payload`: not yet| that KV, sent                              |
| admitted, or swapped out by a preemption)      |                                            |
| waiting to be recomputed, or not here          | refused (`MigrationRefused`): it stays     |
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import torch

from epd.clock import Clock
from epd.cluster.instance.engine_host import EngineHost
from epd.cluster.instance.stage import Outbox, StageManager
from epd.cluster.instance.task_prompt import prompt_from_task
from epd.cluster.kv_handoff import LAYER_KEY, DroppedKV, KVParts, KVSender, part_of
from epd.cluster.messages import MigrationRefused, PrefillTask, RequestError
from epd.engine.llm_engine import LLMEngine
from epd.engine.request import Request, RequestStatus
from epd.lifetime import Event
from epd.outputs import PositionLogprobs
from epd.sampling_params import SamplingParams
from epd.transfer.base import Received


class DecodeStage(StageManager):
    def __init__(
        self,
        instance_id: str,
        llm: EngineHost,
        outbox: Outbox,
        clock: Clock,
        waiting_elsewhere: Callable[[str], bool] = lambda request_id: False,
        kv_sender: KVSender | None = None,
    ) -> None:
        """`waiting_elsewhere`: whether another stage of this instance holds the request before the
        engine does (a PD instance's prefill waiting for embeddings): no KV will come for it then.
        `kv_sender`: where migrated requests' KV leaves (None: migrations are refused)."""
        self.instance_id, self.llm, self.outbox, self.clock = instance_id, llm, outbox, clock
        self.waiting_elsewhere = waiting_elsewhere
        self.kv_sender = kv_sender
        self.kv_parts = KVParts()  # parts (layers, head pieces) waiting for their hand-off
        self.dropped = DroppedKV()  # requests whose late KV is dropped on arrival
        self.awaiting_layers: dict[str, Received] = {}  # request id -> its `kv:`, parts still due
        self.handoffs_received_total = 0  # `kv:` messages, whatever became of them

    def on_transfer(self, received: Received) -> None:
        """A `kvl:` part or the `kv:` hand-off of a request."""
        if received.key.startswith(LAYER_KEY):
            rid = received.meta["request_id"]
            if self.dropped.drop_part(rid, part_of(received.meta)):
                return
            self.kv_parts.add(received)
            held = self.awaiting_layers.get(rid)
            if held is not None and not self.kv_parts.missing(held):
                self._kv_arrived(self.awaiting_layers.pop(rid))
        else:
            self.handoffs_received_total += 1
            self._kv_arrived(received)

    def abort(self, request_id: str) -> None:
        """Runs before the engine forgets the request: whether its KV may still come depends on that."""
        held = self.awaiting_layers.pop(request_id, None)
        arrived = self.kv_parts.drop(request_id)
        if held is not None or self._may_still_receive_kv(request_id):
            self.dropped.remember(request_id, arrived, held)

    def migrate(self, request_id: str, dest: str) -> bool:
        """Send a running request to the decode instance at `dest` (module docstring); False if it
        cannot (the router hears why)."""
        request = self.llm.engine.requests.get(request_id)
        kv = None if request is None else _kv_to_send(self.llm.engine, request)
        if kv is None or self.kv_sender is None:
            why = "it does not run here" if request is None else "its KV is not here (to be recomputed)"
            self.outbox.send(MigrationRefused(self.instance_id, request_id, f"cannot migrate: {why}"))
            return False
        request.record(Event.KV_TRANSFER_START, self.clock.now(), self.instance_id)
        self.kv_sender.route(request_id, dest)
        self.kv_sender.handoff(request, kv)
        self.llm.hand_over(request)
        return True

    def busy_requests(self) -> int:
        return len(set(self.kv_parts.parts) | set(self.awaiting_layers))

    def stats(self) -> dict[str, float]:
        handoffs = {
            "kv_handoffs_received_total": self.handoffs_received_total,
            "kv_handoffs_awaiting_layers": len(self.awaiting_layers),
        }
        return {**self.kv_parts.stats(), **self.dropped.stats(), **handoffs}

    def _may_still_receive_kv(self, request_id: str) -> bool:
        """A decode instance that does not run the request yet may still get its KV from P: the
        abort and the KV take different paths, so the abort can overtake it."""
        return request_id not in self.llm.engine.requests and not self.waiting_elsewhere(request_id)

    def _kv_arrived(self, received: Received) -> None:
        rid = received.meta["request_id"]
        if self.dropped.drop_handoff(received):
            return  # the router finished it as aborted already: nothing to report
        if self.kv_parts.missing(received):
            self.awaiting_layers[rid] = received  # a retried part is on its way
            return
        if received.meta.get("discard"):  # it ended at its first token on P
            self.dropped.remember(rid, self.kv_parts.drop(rid), received)
            return
        try:
            kv = self.kv_parts.complete(received)
        except ValueError as err:
            self.outbox.send(RequestError(self.instance_id, rid, f"KV transfer incomplete: {err}"))
            return
        try:
            request = self._continue(received, kv)
        except ValueError as err:
            self.outbox.send(RequestError(self.instance_id, rid, str(err)))
            return
        request.record(Event.KV_TRANSFER_END, self.clock.now(), self.instance_id)
        # The prefill instance reported its token, and those before it came from earlier attempts.
        self.llm.continues_at(rid, len(request.output_token_ids))

    def _continue(self, received: Received, kv: torch.Tensor) -> Request:
        """Start the handed-off request in the engine, its KV injected (ValueError if it cannot)."""
        meta = received.meta
        task = _task_of(meta)
        logprobs = meta["first_logprobs"]
        if logprobs is not None:
            logprobs = msgspec.convert(logprobs, PositionLogprobs, strict=False)
        return self.llm.engine.add_handoff(
            task.request_id,
            prompt_from_task(task),
            task.params,
            meta["first_token"],
            logprobs,
            kv,
            None,  # no generator state: a seeded request's draws follow from its token count
            task.arrival_time,
            meta.get("earlier_token_ids", ()),
        )


def _kv_to_send(engine: LLMEngine, request: Request) -> torch.Tensor | None:
    """The KV of every token of `request` but its last output, if this engine holds it; else None."""
    computed = request.num_tokens - 1
    if request.kv_payload is not None:
        return request.kv_payload if request.kv_payload.shape[2] == computed else None
    if request.status is RequestStatus.RUNNING and request.num_computed_tokens == computed:
        table = engine.block_manager.block_table(request.request_id)
        return engine.runner.gather_kv(table, computed)
    return None


def _task_of(meta: dict) -> PrefillTask:
    """The request a hand-off's meta describes (epd.cluster.kv_handoff.handoff_meta)."""
    return PrefillTask(
        meta["request_id"],
        meta["prompt_token_ids"],
        [tuple(p) for p in meta["placeholders"]],
        meta["image_hashes"],
        [tuple(g) for g in meta["grids"]],
        msgspec.convert(meta["params"], SamplingParams),
        meta["arrival_time"],
        None,
        meta["prompt"],
        time_intervals=meta.get("time_intervals", []),
    )

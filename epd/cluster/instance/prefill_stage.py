"""The prefill stage: takes `PrefillTask`s, waits for their images' embeddings, admits, hands KV off.

Per image of a task (content hash), the least the stage can ask for:
  in the MM cache        -> pin it for the request;
  asked for already      -> wait for that arrival too (two requests, one transfer);
  otherwise              -> wait, and ask the router for it (`NeedEmbeddings`).
A request is admitted to the engine once every image is pinned for it, and unpins them at its
first token (the request holds its own copies then). Without an MM cache (EP) the engine encodes
the task's pixels itself and the task is admitted at once. Where the KV goes after the first
token is the engine's wiring (engine_host); this stage tells the `KVSender` each request's D.
"""

from __future__ import annotations

from dataclasses import dataclass

from epd.clock import Clock
from epd.cluster.encoder_worker import PixelDecoder
from epd.cluster.instance.engine_host import EngineHost
from epd.cluster.instance.stage import Outbox, StageManager
from epd.cluster.instance.task_prompt import prompt_from_task
from epd.cluster.kv_handoff import KVSender
from epd.cluster.messages import EmbeddingArrived, NeedEmbeddings, PrefillTask, RequestError
from epd.cluster.stats import mm_cache_stats
from epd.engine.mm_cache import MMCache
from epd.engine.request import Request
from epd.inputs.types import ProcessedPrompt
from epd.lifetime import Event, LifetimeEvent
from epd.transfer.base import Received

MM_CACHE_FULL = "the MM cache of this prefill instance is full (raise mm_cache_bytes)"


@dataclass
class _Pending:
    """A prefill waiting for image embeddings to arrive."""

    task: PrefillTask
    prompt: ProcessedPrompt
    missing: set[str]


class PrefillStage(StageManager):
    def __init__(
        self,
        instance_id: str,
        llm: EngineHost,
        mm_cache: MMCache | None,
        kv_sender: KVSender,
        decode_pixels: PixelDecoder,
        outbox: Outbox,
        clock: Clock,
    ) -> None:
        self.instance_id, self.llm, self.mm_cache, self.kv_sender = instance_id, llm, mm_cache, kv_sender
        self.decode_pixels, self.outbox, self.clock = decode_pixels, outbox, clock
        self.pending: dict[str, _Pending] = {}
        self.waiting_on: dict[str, list[str]] = {}  # content hash -> request ids
        self.requested: set[str] = set()  # hashes asked of the router, not yet arrived
        self.held: dict[str, set[str]] = {}  # request id -> hashes it pins in the MM cache

    def on_message(self, msg: object) -> None:
        assert isinstance(msg, PrefillTask), msg
        self._prefill_task(msg)

    def on_transfer(self, received: Received) -> None:
        """An image's embeddings (`mm:<hash>`) from an encoder instance."""
        self._embedding_arrived(received)

    def on_advanced(self, request: Request) -> None:
        """The engine advanced the request (after it was reported)."""
        if len(request.output_token_ids) >= 1:
            self._unpin_images(request.request_id)  # prefill is done: the request holds its own copies
        if request.finish_reason is not None:
            self.kv_sender.forget(request.request_id)

    def is_waiting(self, request_id: str) -> bool:
        """Whether the request waits here for embeddings (the engine has not seen it yet)."""
        return request_id in self.pending

    def abort(self, request_id: str) -> None:
        pending = self.pending.pop(request_id, None)
        if pending is not None:
            for h in pending.missing:
                if request_id in self.waiting_on.get(h, []):
                    self.waiting_on[h].remove(request_id)
        if self.mm_cache is not None:
            self._unpin_images(request_id)
        self.kv_sender.forget(request_id)

    def busy_requests(self) -> int:
        return len(set(self.pending) | set(self.held) | set(self.kv_sender.dest))

    def stats(self) -> dict[str, float]:
        return mm_cache_stats(self.mm_cache)

    # ---- tasks and embeddings ------------------------------------------------------------------

    def _prefill_task(self, task: PrefillTask) -> None:
        prompt = prompt_from_task(task, self.decode_pixels)
        try:
            self.llm.engine.check_fits(len(task.prompt_token_ids))
        except ValueError as err:
            self.outbox.send(RequestError(self.instance_id, task.request_id, str(err)))
            return
        if task.decode_dest is not None:
            self.kv_sender.route(task.request_id, task.decode_dest)
        if self.mm_cache is None:  # encodes in-process
            self._admit(task, prompt)
            return
        missing = self._pin_or_wait(task)
        if missing:
            self.pending[task.request_id] = _Pending(task, prompt, missing)
        else:
            self._admit(task, prompt)

    def _pin_or_wait(self, task: PrefillTask) -> set[str]:
        """Pin the task's cached images; the hashes still missing (asked of the router if new)."""
        missing, need = set(), []
        held = self.held.setdefault(task.request_id, set())
        for i, h in enumerate(task.image_hashes):
            if h in held or h in missing:
                continue
            if self.mm_cache.lookup(h):
                self.mm_cache.pin(h)
                held.add(h)
                continue
            missing.add(h)
            self.waiting_on.setdefault(h, []).append(task.request_id)
            if h not in self.requested:
                self.requested.add(h)
                need.append(i)
        if need:
            self.outbox.send(NeedEmbeddings(self.instance_id, task.request_id, need))
        return missing

    def _embedding_arrived(self, received: Received) -> None:
        h, source = received.meta["content_hash"], received.meta["source"]
        waiters = self.waiting_on.pop(h, [])
        self.requested.discard(h)
        end = Event.MM_TRANSFER_END
        events = [(rid, LifetimeEvent.now(self.clock, end, self.instance_id)) for rid in waiters]
        self.outbox.send(EmbeddingArrived(self.instance_id, h, source, events))
        if not self.mm_cache.put(h, received.tensors["embeds"]):
            for rid in waiters:
                self._fail(rid, MM_CACHE_FULL)
            return
        for rid in waiters:
            pending = self.pending.get(rid)
            if pending is None:
                continue  # aborted meanwhile
            self.mm_cache.pin(h)
            self.held.setdefault(rid, set()).add(h)
            pending.missing.discard(h)
            if not pending.missing:
                del self.pending[rid]
                self._admit(pending.task, pending.prompt)
        self.mm_cache.unpin(h)  # the arrival's own pin: the waiters hold theirs

    def _admit(self, task: PrefillTask, prompt: ProcessedPrompt) -> None:
        self.llm.engine.add_request(task.request_id, prompt, task.params, task.arrival_time)

    def _unpin_images(self, request_id: str) -> None:
        for h in self.held.pop(request_id, ()):
            self.mm_cache.unpin(h)

    def _fail(self, request_id: str, error: str) -> None:
        self.abort(request_id)
        self.llm.abort(request_id)
        self.outbox.send(RequestError(self.instance_id, request_id, error))

"""Continuous batching over a paged KV cache.

Every step: all running requests decode one token, then waiting requests are admitted
(first come, first served) while the step has room. Admission limits, in order:
  1. at most `max_num_seqs` requests run at once;
  2. the step computes at most `max_num_batched_tokens` tokens (decodes count one each);
  3. a prefill is admitted only when the block manager can hold all its tokens.
When a decode finds no free block, the newest running request is preempted: its blocks
are freed and it goes back to the front of the queue, to be recomputed later, or, where
its prompt cannot be recomputed here (a decode instance holds no image embeddings), its
KV is swapped out to host memory first. A request is never failed for lack of blocks
once admitted.

A request that arrives with KV computed elsewhere (`kv_payload`: a prefill instance's
hand-off, or its own swapped-out KV) is admitted like a prefill; the batch lists it in
`injections` and the runner writes that KV into its blocks before the forward, so only
the tokens after it are computed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from epd.engine.block_manager import BlockManager
from epd.engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    """What one step computes: request i gets `num_new_tokens[i]` tokens, from its
    `num_computed_tokens` on, in this order in the flat batch."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # (request, first row to write): KV to copy from request.kv_payload before the forward.
    injections: list[tuple[Request, int]] = field(default_factory=list)

    def add(self, request: Request, num_tokens: int) -> None:
        self.requests.append(request)
        self.num_new_tokens.append(num_tokens)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        swap_out: Callable[[Request], bool] | None = None,
    ) -> None:
        """`swap_out(request)` is called before a preempted request's blocks are freed; it
        returns True if it saved the request's KV in `kv_payload` (then no recompute)."""
        self.blocks = block_manager
        self.swap_out = swap_out
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # cumulative, for metrics and tests

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._schedule_decodes(batch)
        if not batch.preempted:  # blocks are short: admitting now would only thrash
            self._admit_prefills(batch)
        return batch

    def _schedule_decodes(self, batch: ScheduledBatch) -> None:
        scheduled: list[Request] = []
        queue = deque(self.running)  # oldest first; victims come off the newest end
        while queue:
            request = queue.popleft()
            while not self.blocks.append_slots(request.request_id, request.num_tokens):
                victim = queue.pop() if queue else request
                self._preempt(victim, batch)
                if victim is request:
                    break
            else:
                scheduled.append(request)
                batch.add(request, request.num_tokens_to_compute)
        self.running = scheduled

    def _admit_prefills(self, batch: ScheduledBatch) -> None:
        budget = self.max_num_batched_tokens - batch.total_tokens
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            request = self.waiting[0]
            if request.num_tokens > budget and batch:
                break  # may not fit even with prefix hits; it leads the next step
            cached = self.blocks.allocate_prompt(
                request.request_id, request.all_token_ids, request.prompt.mm_spans
            )
            if cached is None:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            if request.num_preemptions == 0:
                request.num_cached_tokens = cached
            request.num_computed_tokens = cached
            if request.kv_payload is not None:
                batch.injections.append((request, cached))
                request.num_computed_tokens = request.kv_payload.shape[2]
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.add(request, request.num_tokens_to_compute)
            budget -= request.num_tokens_to_compute

    def _preempt(self, request: Request, batch: ScheduledBatch) -> None:
        if self.swap_out is not None:
            self.swap_out(request)
        self.blocks.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        batch.preempted.append(request)

    def finish(self, request: Request) -> None:
        """Release a finished (or aborted) request's blocks and forget it."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if self.blocks.has(request.request_id):
            self.blocks.free(request.request_id)
        request.status = RequestStatus.FINISHED

"""Continuous batching over a paged KV cache.

Every step: all running requests decode one token, then waiting requests are admitted
(first come, first served) while the step has room. Admission limits, in order:
  1. at most `max_num_seqs` requests run at once;
  2. the step computes at most `max_num_batched_tokens` tokens (decodes count one each);
  3. a prefill is admitted only when the block manager can hold all its tokens.
When a decode finds no free block, the newest running request is preempted: its blocks
are freed and it goes back to the front of the queue, to be recomputed later. A request
is never failed for lack of blocks once admitted.
"""

from __future__ import annotations

from collections import deque
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

    def add(self, request: Request, num_tokens: int) -> None:
        self.requests.append(request)
        self.num_new_tokens.append(num_tokens)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = block_manager
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
        while self.running:
            request = self.running.pop(0)
            while not self.blocks.append_slots(request.request_id, request.num_tokens):
                victim = self.running.pop() if self.running else request
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
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.add(request, request.num_tokens_to_compute)
            budget -= request.num_tokens_to_compute

    def _preempt(self, request: Request, batch: ScheduledBatch) -> None:
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

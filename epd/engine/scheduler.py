"""Continuous batching over a paged KV cache, with chunked prefill.

Every step computes at most `max_num_batched_tokens` tokens (the budget), handed out in this order:
  1. running requests with one token to compute (decodes), oldest first;
  2. running requests whose prompt is partly computed: the next chunk of each, oldest first;
  3. waiting requests, while the step has room, in the queue policy's order (epd.engine.queue_policy:
     first come first served by default; by deadline slack or priority; preempted requests first).
Admission limits, in order:
  1. at most `max_num_seqs` requests run at once;
  2. the step computes at most the budget (the one exception is in the table below);
  3. a prefill is admitted only when the block manager can hold all its tokens. Its blocks are
     taken at admission, so its later chunks never wait for blocks.

What a prompt that does not fit the rest of the budget does:

| chunked_prefill | it fits         | it does not fit                                                 |
|-----------------|-----------------|-----------------------------------------------------------------|
| on              | runs whole      | its first tokens run now, as many as fit; the rest in the next  |
|                 |                 | steps (step 2 above), beside the decodes                        |
| off             | runs whole      | waits for the next step, at the head of the queue; alone in a   |
|                 |                 | step it runs whole, whatever the budget                         |

A step that leaves a request with tokens still to compute samples nothing for it
(`ScheduledBatch.samples`): its next token exists only once its whole prompt has been computed.

When a request finds no free block, the newest running request is preempted (partly prefilled
prompts before decodes: they come last in the order above): its blocks are freed and it goes
back to the front of the queue, to be recomputed later, or, where its prompt cannot be
recomputed here (a decode instance holds no image embeddings), its KV is swapped out to host
memory first. A request is never failed for lack of blocks once admitted.

A request that arrives with KV computed elsewhere (`kv_payload`: a prefill instance's
hand-off, or its own swapped-out KV) is admitted like a prefill; the batch lists it in
`injections` and the runner writes that KV into its blocks before the forward, so only
the tokens after it are computed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from epd.clock import WALL_CLOCK, Clock
from epd.engine.block_manager import BlockManager
from epd.engine.queue_policy import FCFS, QueuePolicy, Urgency
from epd.engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    """What one step computes: request i gets `num_new_tokens[i]` tokens, from its
    `num_computed_tokens` on, in this order in the flat batch. `samples[i]`: those tokens
    complete request i (a decode, or a prompt's last chunk), so the step samples its next token."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # (request, first row to write): KV to copy from request.kv_payload before the forward.
    injections: list[tuple[Request, int]] = field(default_factory=list)

    def add(self, request: Request, num_tokens: int) -> None:
        """Schedule `num_tokens` of the request's tokens, from its `num_computed_tokens` on."""
        self.requests.append(request)
        self.num_new_tokens.append(num_tokens)
        self.samples.append(request.num_computed_tokens + num_tokens == request.num_tokens)

    def token_ends(self) -> list[int]:
        """Per request, where this step's tokens end: a prefill chunk needs only the images that
        start before it (ImageEmbedder.ensure)."""
        return [req.num_computed_tokens + n for req, n in zip(self.requests, self.num_new_tokens)]

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
        chunked_prefill: bool = False,
        queue_policy: QueuePolicy = FCFS,
        clock: Clock = WALL_CLOCK,
    ) -> None:
        """`swap_out(request)` is called before a preempted request's blocks are freed; it
        returns True if it saved the request's KV in `kv_payload` (then no recompute).
        `chunked_prefill`: see the module docstring (the engine turns it on where it decodes)."""
        self.blocks = block_manager
        self.swap_out = swap_out
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.queue_policy, self.clock = queue_policy, clock  # the clock of request arrival times
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the newest last
        self.num_preemptions = 0  # cumulative, for metrics and tests

    def set_prefill_policy(self, chunked_prefill: bool, max_num_batched_tokens: int) -> None:
        """Change how prompts are prefilled (an engine's role switch); only while it is idle."""
        if self.has_unfinished():
            raise RuntimeError("the prefill policy can change only while no request is scheduled")
        self.chunked_prefill, self.max_num_batched_tokens = chunked_prefill, max_num_batched_tokens

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if not batch.preempted:  # blocks are short: admitting now would only thrash
            self._admit_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        """Decodes first, then the next chunk of each partly prefilled prompt; returns the budget
        left. A request the budget has no room for keeps its blocks and waits for the next step."""
        # Stable sort: oldest first within each group, so that victims come off the newest end.
        queue = deque(sorted(self.running, key=lambda r: r.num_tokens_to_compute > 1))
        while queue and budget > 0:
            request = queue.popleft()
            num_tokens = min(request.num_tokens_to_compute, budget)
            if self._make_room(request, num_tokens, queue, batch):
                batch.add(request, num_tokens)
                budget -= num_tokens
        self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        return budget

    def _make_room(
        self, request: Request, num_tokens: int, queue: deque[Request], batch: ScheduledBatch
    ) -> bool:
        """Blocks for the request's next `num_tokens`, preempting the newest requests not yet
        scheduled this step (the request itself last). False if the request was preempted."""
        while not self.blocks.append_slots(request.request_id, request.num_computed_tokens + num_tokens):
            victim = queue.pop() if queue else request
            self._preempt(victim, batch)
            if victim is request:
                return False
        return True

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        if self.queue_policy.reorders:
            now = self.clock.now()
            self.waiting = deque(sorted(self.waiting, key=lambda r: self._waiting_key(r, now)))
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            request = self.waiting[0]
            if not self.chunked_prefill and request.num_tokens > budget and batch:
                break  # may not fit even with prefix hits; it leads the next step
            if not self._allocate(request, batch):
                break  # nobody overtakes the head of the queue
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_tokens = request.num_tokens_to_compute
            if self.chunked_prefill:
                num_tokens = min(num_tokens, budget)
            batch.add(request, num_tokens)
            budget -= num_tokens

    def _waiting_key(self, request: Request, now: float) -> tuple[float, ...]:
        if request.num_preemptions:  # it ran already: back first, as under FCFS
            return (-1,)
        params = request.params
        urgency = Urgency(request.arrival_time, params.slo_ttft, params.priority)
        return self.queue_policy.key(urgency, now, tokens=request.num_tokens_to_compute)

    def _allocate(self, request: Request, batch: ScheduledBatch) -> bool:
        """Blocks for all the request's tokens; its computed tokens are then its prefix-cache hits,
        or the KV it brings (injected before the forward). False if the blocks are short."""
        cached = self.blocks.allocate_prompt(
            request.request_id, request.all_token_ids, request.prompt.mm_spans
        )
        if cached is None:
            return False
        if request.num_preemptions == 0:
            request.num_cached_tokens = cached
        request.num_computed_tokens = cached
        if request.kv_payload is not None:
            batch.injections.append((request, cached))
            request.num_computed_tokens = request.kv_payload.shape[2]
        return True

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

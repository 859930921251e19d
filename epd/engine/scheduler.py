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

SLOs (epd.engine.step_estimator predicts step times; nothing changes while it has no estimate):
  - TPOT budget: while requests decode here, the prefill tokens of a step (chunks, admissions,
    KV hand-offs that join the decodes) stop where the step's predicted time would pass
    `TPOT_MARGIN` of the tightest TPOT target among them (below the line: see there). Decodes
    are never cut (that would only slow them more); a prefill the budget leaves no room for
    waits until some decodes end.
  - Late requests: a waiting request that misses its TTFT deadline even if its prefill started now
    (predicted alone, a lower bound) is served best-effort after the others (queue_policy, slo), or,
    with `reject_late`, refused: taken out of the queue into `rejected`, with a retry-after (the
    predicted seconds of the work queued here, at least 1). Only requests without a token yet.

A request that arrives with KV computed elsewhere (`kv_payload`: a prefill instance's
hand-off, or its own swapped-out KV) is admitted like a prefill; the batch lists it in
`injections` and the runner writes that KV into its blocks before the forward, so only
the tokens after it are computed.

With async scheduling (epd.engine.async_scheduling) the engine forms a pure decode step while the one
before is still on the device (`schedule_continuation`), only where `schedule` would give the same.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from epd.clock import WALL_CLOCK, Clock
from epd.engine.block_manager import BlockManager
from epd.engine.queue_policy import FCFS, QueuePolicy, Urgency
from epd.engine.request import Request, RequestStatus
from epd.engine.step_estimator import Queue, Seq, StepEstimator, batch_seqs, served_next_seconds

# The share of the tightest TPOT target that a step's predicted time may fill. A prediction is an
# estimate (an online fit, a profile's error, the host's jitter): steps filled up to the target itself
# run over it about half the time, so requests whose steps are all full miss their TPOT by a few
# percent (issue 20: `epd simulate` of the bursty two-class mix, 4EPD, at 14-19 req/s: 6-11% of the
# requests over 50 ms, every one by less than 4%). 5% below the target removed every such miss
# there; a wider margin (0.9) only cost prefill tokens beside the decodes, hence TTFTs.
TPOT_MARGIN = 0.95


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
        estimator: StepEstimator | None = None,
        default_slo_tpot: float | None = None,
        reject_late: bool = False,
        tpot_margin: float = TPOT_MARGIN,
    ) -> None:
        """`swap_out(request)` is called before a preempted request's blocks are freed; it
        returns True if it saved the request's KV in `kv_payload` (then no recompute).
        `chunked_prefill`: see the module docstring (the engine turns it on where it decodes).
        `estimator`, `default_slo_tpot` (of requests that set no slo_tpot), `reject_late`,
        `tpot_margin` (1.0: aim at the target itself): SLOs, above."""
        self.blocks = block_manager
        self.swap_out = swap_out
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.queue_policy, self.clock = queue_policy, clock  # the clock of request arrival times
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the newest last
        self.num_preemptions = 0  # cumulative, for metrics and tests
        self.estimator, self.default_slo_tpot, self.reject_late = estimator, default_slo_tpot, reject_late
        self.tpot_margin = tpot_margin
        self.rejected: list[tuple[Request, float]] = []  # (request, retry after s): the engine reports them
        self.num_late = self.num_rejected = 0  # cumulative: found late (served best-effort), refused
        self._late: set[str] = set()  # ids of waiting requests already counted late
        self._step_budget_s: float | None = None  # predicted seconds the step being formed may take

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
        self._step_budget_s = self._tpot_budget()
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if not batch.preempted:  # blocks are short: admitting now would only thrash
            self._admit_waiting(batch, budget)
        return batch

    def schedule_continuation(
        self, continuing: list[Request], in_flight: list[Request]
    ) -> ScheduledBatch | None:
        """The next step while the last one (`in_flight`: its requests) is still on the device
        (async scheduling, epd.engine.async_scheduling): one decode token for each of `continuing`,
        the token that step is sampling (the engine holds a placeholder for it meanwhile, so that
        `num_tokens` counts it). The in-flight requests left out end at that step (their length).

        None, with no state change, wherever `schedule` could decide otherwise once that step's
        tokens are known: 1. a request waits (admission, rejection); 2. a running request is not
        in flight (a prompt's next chunk, a decode the budget left out); 3. the budget is short;
        4. blocks are short (preemption). Otherwise `schedule` would give these decodes, in this
        order, less those that turn out to end at the in-flight step (EOS, stop: wasted rows)."""
        flying = {id(r) for r in in_flight}
        if self.waiting or any(id(r) not in flying for r in self.running):
            return None
        if len(continuing) > self.max_num_batched_tokens:
            return None
        if sum(self._blocks_for_next_token(r) for r in continuing) > self.blocks.num_free_blocks:
            return None
        chosen = {id(r) for r in continuing}
        batch = ScheduledBatch()
        for request in self.running:  # the order `schedule` gives decodes in
            if id(request) in chosen:
                if not self.blocks.append_slots(request.request_id, request.num_computed_tokens + 1):
                    raise AssertionError("blocks counted free above were not")
                batch.add(request, 1)
        return batch

    def _blocks_for_next_token(self, request: Request) -> int:
        """New blocks `append_slots` would take for the request's next token (0 or 1)."""
        needed = self.blocks.blocks_needed(request.num_computed_tokens + 1)
        return max(0, needed - len(self.blocks.block_table(request.request_id)))

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        """Decodes first, then the next chunk of each partly prefilled prompt; returns the budget
        left. A request the budget has no room for keeps its blocks and waits for the next step."""
        # Stable sort: oldest first within each group, so that victims come off the newest end.
        queue = deque(sorted(self.running, key=lambda r: r.num_tokens_to_compute > 1))
        while queue and budget > 0:
            request = queue.popleft()
            num_tokens = min(request.num_tokens_to_compute, budget)
            if request.num_tokens_to_compute > 1:  # a chunk: within the TPOT budget
                num_tokens = self._tpot_room(batch, request, num_tokens)
                if num_tokens == 0:
                    continue
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
        now = self.clock.now()
        remaining = self._remaining_seconds(now)
        if self.queue_policy.reorders:
            self.waiting = deque(sorted(self.waiting, key=lambda r: self._waiting_key(r, now, remaining)))
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            request = self.waiting[0]
            if not self.chunked_prefill and request.num_tokens > budget and batch:
                break  # may not fit even with prefix hits; it leads the next step
            if not self._tpot_admits(batch, request, budget):
                break  # the decodes' TPOT budget has no room for it this step
            if not self._allocate(request, batch):
                break  # nobody overtakes the head of the queue
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_tokens = request.num_tokens_to_compute
            if self.chunked_prefill:  # at least the token _tpot_admits found room for
                num_tokens = max(1, self._tpot_room(batch, request, min(num_tokens, budget)))
            batch.add(request, num_tokens)
            budget -= num_tokens

    def _waiting_key(self, request: Request, now: float, remaining: dict[str, float]) -> tuple[float, ...]:
        if request.num_preemptions:  # it ran already: back first, as under FCFS
            return (-1,)
        return self.queue_policy.key(
            _urgency(request),
            now,
            tokens=request.num_tokens_to_compute,
            remaining_s=remaining.get(request.request_id),
        )

    # ---- SLOs: late requests, the TPOT budget (see the module docstring) ------------------------

    def _remaining_seconds(self, now: float) -> dict[str, float]:
        """Predicted seconds to the first token of each waiting request if served next (those the
        estimator can predict); counts the late ones and, with `reject_late`, refuses them."""
        if self.estimator is None or not (self.reject_late or self.queue_policy.name == "slo"):
            return {}
        queue = self._queue_now()
        waiting_tokens = sum(r.num_tokens_to_compute for r in self.waiting)
        remaining: dict[str, float] = {}
        for request in self.waiting:
            seconds = self._served_next(queue, request, waiting_tokens - request.num_tokens_to_compute)
            if seconds is not None:
                remaining[request.request_id] = seconds
        late = [r for r in self.waiting if self._is_late(r, now, remaining)]
        for request in late:
            if request.request_id not in self._late:
                self._late.add(request.request_id)
                self.num_late += 1
        if self.reject_late and late:
            self._reject(late, queue, now)
        return remaining

    def _queue_now(self) -> Queue:
        decodes = tuple(
            Seq(1, r.num_computed_tokens, r.num_prompt_tokens)
            for r in self.running
            if r.num_tokens_to_compute == 1
        )
        ahead = sum(r.num_tokens_to_compute for r in self.running if r.num_tokens_to_compute > 1)
        return Queue(decodes, ahead, 0, self.max_num_batched_tokens, self.chunked_prefill)

    def _served_next(self, queue: Queue, request: Request, behind: int) -> float | None:
        assert self.estimator is not None
        own = Seq(request.num_tokens_to_compute, request.num_computed_tokens, request.num_prompt_tokens)
        return served_next_seconds(self.estimator, replace(queue, behind=behind), own)

    def _is_late(self, request: Request, now: float, remaining: dict[str, float]) -> bool:
        """Late, and still before its first token (what a TTFT deadline is about). Without an
        estimate only a deadline already past is late."""
        if request.output_token_ids or request.num_preemptions:
            return False
        return self.queue_policy.is_late(_urgency(request), now, remaining.get(request.request_id, 0.0))

    def _reject(self, late: list[Request], queue: Queue, now: float) -> None:
        """Refuse the late requests; retry after the predicted time of all the work queued here
        (at least 1 s): what a retry would wait behind."""
        refused = {id(r) for r in late}
        self.waiting = deque(r for r in self.waiting if id(r) not in refused)
        assert self.estimator is not None
        queued = queue.ahead + sum(r.num_tokens_to_compute for r in self.waiting)
        backlog = served_next_seconds(self.estimator, replace(queue, ahead=0), Seq(queued, 0, queued))
        retry_after = max(1.0, math.ceil(backlog or 0.0))
        for request in late:
            self._late.discard(request.request_id)
            request.status = RequestStatus.FINISHED
            request.metrics.finished_time = now
            self.rejected.append((request, retry_after))
        self.num_rejected += len(late)

    def _tpot_budget(self) -> float | None:
        """The predicted seconds a step may take: `tpot_margin` of the tightest TPOT target of the
        requests decoding here (None: none has one, or no estimator)."""
        if self.estimator is None:
            return None
        targets = [
            r.params.slo_tpot if r.params.slo_tpot is not None else self.default_slo_tpot
            for r in self.running
            if r.output_token_ids
        ]
        tightest = min((t for t in targets if t is not None), default=None)
        return None if tightest is None else tightest * self.tpot_margin

    def _tpot_admits(self, batch: ScheduledBatch, request: Request, budget: int) -> bool:
        """Whether a waiting request fits the TPOT budget before its blocks are taken: one token
        of it when chunked, else all (a hand-off: the tokens after the KV it brings, joining the
        decodes). Without prefix hits counted: a hit only makes the step cheaper."""
        computed = request.kv_payload.shape[2] if request.kv_payload is not None else 0
        tokens = request.num_tokens - computed
        needed = 1 if self.chunked_prefill else tokens
        return self._tpot_room(batch, request, min(needed, budget), computed) >= min(needed, budget)

    def _tpot_room(
        self, batch: ScheduledBatch, request: Request, num_tokens: int, computed: int | None = None
    ) -> int:
        """How many of the request's next `num_tokens` the step can take within the TPOT budget:
        the largest count whose predicted step time stays within it (predicted time grows with it).
        `computed`: its tokens computed before them (default: as it stands)."""
        target, estimator = self._step_budget_s, self.estimator
        if target is None or estimator is None or num_tokens <= 0:
            return num_tokens
        seqs = batch_seqs(batch)
        prompt = request.num_prompt_tokens
        computed = request.num_computed_tokens if computed is None else computed

        def fits(n: int) -> bool:
            seconds = estimator.step_seconds([*seqs, Seq(n, computed, prompt)])
            return seconds is None or seconds <= target

        low, high = 0, num_tokens  # fits(low) is assumed; find the largest n that fits
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle) else (low, middle - 1)
        return low

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
        self._late.discard(request.request_id)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if self.blocks.has(request.request_id):
            self.blocks.free(request.request_id)
        request.status = RequestStatus.FINISHED


def _urgency(request: Request) -> Urgency:
    params = request.params
    return Urgency(request.arrival_time, params.slo_ttft, params.priority)

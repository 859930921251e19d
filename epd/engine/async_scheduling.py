"""Async scheduling: the host forms and launches decode step n+1 while the device still runs step n.

Hot path. In a synchronous step the device idles while the host reads the sampled tokens, checks
stops, schedules and builds the next inputs; here that host work runs beside the device's. Each
`AsyncStepper.step` call, in the steady state:

    host:    launch n+1 (tokens: n's, on the device) | wait for n's tokens | stops, frees, outputs of n
    device:  ......... step n runs ......... | n+1 runs ...........................................

1. Launch n+1 assuming that every request of step n goes on: the scheduler gives each one a decode
   token (`Scheduler.schedule_continuation`), the token n is sampling; meanwhile a placeholder holds
   its place in the request's outputs (`_placeholders`), so that the counts, the block table and the
   seeded generator's position are those of step n+1. The graph reads the real ids from the device.
2. Read n's tokens (one wait, on an event after their copy to pinned memory) and postprocess them as
   the synchronous engine does: stops, text, frees (`LLMEngine._postprocess`).
3. At the next call, count n+1's tokens as computed (and commit the blocks they fill: their token ids
   are known by then), but only for the requests still alive: a request that ended at step n (EOS,
   a stop string) or was aborted (or handed over) since had one wasted row in n+1, whose token is
   dropped and whose KV lands in blocks it no longer holds: before, in stream order, any later
   owner writes them, and never in a block registered for prefix reuse (that row's block was not
   full: it holds a slot no step had computed).

So between two calls the requests stand exactly as after a synchronous step (outputs through step n,
`num_computed_tokens == num_tokens - 1`); only the device is already computing their next step.
Outputs equal the synchronous engine's: the step n+1 of the surviving requests is the one `schedule`
would give them (no waiting request, every running request in flight, budget and blocks enough;
else the step is not continued: step n is read, and the next call schedules as usual), and each row's
draw depends on its own request alone, except the shared generator of unseeded random rows, which
a wasted row would advance: a step with such a row is not continued. A request that ends by its
length at step n (max_tokens, max_model_len) is known to end before its token: it gets no row.
Bit for bit where both engines run the same batches; a wasted row, or an arrival joining one step
later, changes the shape of a batch, and GEMMs of another shape may round differently (on a CPU;
with CUDA graphs only across a padded size): logprobs then agree to rounding (~1e-7), tokens too
unless two were tied to within it.

Which steps: a step is launched without waiting only when it is pure decode (one sampled token per
request, no KV injection) on an engine that decodes (no hand-off, no layer streaming). Everything
else (prefills, chunks, admissions, preemptions, swaps) runs synchronously, as before. An arrival
waits for the step in flight to be read (one step later than in a synchronous engine).

On a CPU the same path runs with no real overlap (the device is the host), which is what the tests
check it by. Any runner that prepares and launches steps apart (`LaunchingRunner`): a `ModelRunner`,
or a tensor-parallel instance's (epd.parallel.runner), whose workers get the ids in flight by a
broadcast on the device; a scripted runner is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from epd.engine.model_runner import StepInputs
from epd.engine.request import Request
from epd.engine.sampler import HostCopy, to_device
from epd.engine.scheduler import ScheduledBatch

if TYPE_CHECKING:
    from epd.engine.llm_engine import LLMEngine

PLACEHOLDER = 0  # the id a not yet known token holds in `output_token_ids`; the device has the real one


@dataclass
class InflightStep:
    """A pure decode step launched and not yet read: every row of `batch` samples."""

    batch: ScheduledBatch
    token_ids: torch.Tensor  # [rows] the sampled ids, on the device: the next step's inputs
    copy: HostCopy
    launched_at: float  # clock.monotonic() at launch

    @property
    def requests(self) -> list[Request]:
        return self.batch.requests


@runtime_checkable
class LaunchingRunner(Protocol):
    """A runner whose steps are prepared on the host and launched on the device apart."""

    def prepare(self, batch: ScheduledBatch, block_tables: list[list[int]]) -> StepInputs: ...

    def forward(
        self,
        step: StepInputs,
        after_layer: Callable[[int], None] | None = None,
        logits: bool = True,
        token_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | None: ...


class AsyncStepper:
    """`LLMEngine.step_requests` with async scheduling; it drives its engine's parts (scheduler,
    runner, sampler) and the engine's own step phases (`_advance_computed`, `_postprocess`)."""

    def __init__(self, engine: LLMEngine) -> None:
        if not isinstance(engine.runner, LaunchingRunner):
            raise ValueError(
                f"async scheduling needs a runner that launches steps on a device, not "
                f"{type(engine.runner).__name__} (a scripted one): turn async_scheduling off"
            )
        self.engine = engine
        self.inflight: InflightStep | None = None
        self.num_overlapped_steps = 0  # steps launched while the one before was still in flight
        self._last_read_at = 0.0

    def step(self) -> list[Request]:
        """Like the synchronous step, one step late for pure decodes: the requests advanced by the
        step read in this call (or by the synchronous step run in it)."""
        engine = self.engine
        if self.inflight is not None:
            if all(r.is_finished for r in self.inflight.requests):
                self.inflight = None  # every row ended: nothing to read (its writes land in freed blocks)
            else:
                engine._advance_computed(_alive(self.inflight.batch))  # its input tokens are known now
        if self.inflight is None:
            batch = engine.scheduler.schedule()
            if not batch:
                return []
            if not self._launchable(batch):
                return engine._run_step(batch)
            self.inflight = self._launch(batch, None)
            engine._advance_computed(batch)
        current = self.inflight
        self.inflight = self._continue(current)
        if self.inflight is not None:
            self.num_overlapped_steps += 1
        return self._read(current)

    # ---- launching --------------------------------------------------------------------------

    def _launchable(self, batch: ScheduledBatch) -> bool:
        """A pure decode step of an engine that decodes: its tokens may stay on the device a while."""
        engine = self.engine
        if engine.handoff is not None or batch.injections or batch.preempted:
            return False
        return all(
            n == 1 and samples and req.num_computed_tokens >= req.num_prompt_tokens
            for req, n, samples in zip(batch.requests, batch.num_new_tokens, batch.samples)
        )

    def _continue(self, current: InflightStep) -> InflightStep | None:
        """Launch the step after `current` from its tokens on the device; None where it cannot be
        formed before they are known (see the module docstring)."""
        engine = self.engine
        continuing = [r for r in current.requests if not r.is_finished and not self._ends_by_length(r)]
        if not continuing or engine.handoff is not None:
            return None
        if any(not r.params.greedy and r.params.seed is None for r in continuing):
            return None  # a wasted row would advance the shared generator: other rows' draws would differ
        with _placeholders(continuing):
            batch = engine.scheduler.schedule_continuation(continuing, current.requests)
            if batch is None:
                return None
            return self._launch(batch, _rows_of(current, batch))

    def _ends_by_length(self, req: Request) -> bool:
        """Whether the token in flight ends `req` whatever it is (epd.engine.stop: the length limits)."""
        max_tokens = req.params.max_tokens
        num_outputs = len(req.output_token_ids) + 1
        if max_tokens is not None and num_outputs >= max_tokens:
            return True
        return req.num_tokens + 1 >= self.engine.max_model_len

    def _launch(self, batch: ScheduledBatch, token_ids: torch.Tensor | None) -> InflightStep:
        """Forward and sample `batch` without waiting; `token_ids` given: its input ids, on the device."""
        engine = self.engine
        runner: LaunchingRunner = engine.runner
        tables = [engine.block_manager.block_table(r.request_id) for r in batch.requests]
        logits = runner.forward(runner.prepare(batch, tables), token_ids=token_ids)
        sample = engine.sampler.sample(
            logits,
            [r.params for r in batch.requests],
            [r.generator or engine.shared_generator for r in batch.requests],
        )
        return InflightStep(batch, sample.token_ids, HostCopy(sample), engine.clock.monotonic())

    # ---- reading ----------------------------------------------------------------------------

    def _read(self, step: InflightStep) -> list[Request]:
        """Wait for `step`'s tokens and postprocess those of the requests still alive."""
        engine = self.engine
        sampled = step.copy.result()
        rows = [i for i, r in enumerate(step.requests) if not r.is_finished]
        advanced = engine._postprocess(
            [step.requests[i] for i in rows],
            [sampled.token_ids[i] for i in rows],
            [sampled.logprobs[i] for i in rows],
        )
        now = engine.clock.monotonic()
        # The device's time for the step: from its launch, or from the last read if it queued behind that.
        engine._count_step(step.batch, now - max(step.launched_at, self._last_read_at))
        self._last_read_at = now
        return advanced


@contextmanager
def _placeholders(requests: list[Request]) -> Iterator[None]:
    """The token in flight of each request, as `PLACEHOLDER`, while the next step is formed: the
    scheduler then counts one token to compute, the inputs hold a slot for it, and a seeded request's
    generator is set for the token after it. Taken out before the real token is appended."""
    for req in requests:
        req.output_token_ids.append(PLACEHOLDER)
    try:
        yield
    finally:
        for req in requests:
            req.output_token_ids.pop()


def _rows_of(current: InflightStep, batch: ScheduledBatch) -> torch.Tensor:
    """The input ids of `batch` on the device: the tokens `current` samples, in `batch`'s row order."""
    row = {id(r): i for i, r in enumerate(current.requests)}
    index = [row[id(r)] for r in batch.requests]
    if index == list(range(len(current.requests))):
        return current.token_ids  # the same requests in the same order: no gather
    return current.token_ids[to_device(index, current.token_ids.device)]


def _alive(batch: ScheduledBatch) -> ScheduledBatch:
    """`batch` without the requests that ended meanwhile (their rows were wasted)."""
    if not any(r.is_finished for r in batch.requests):
        return batch
    alive = ScheduledBatch()
    for req, n, samples in zip(batch.requests, batch.num_new_tokens, batch.samples):
        if not req.is_finished:
            alive.requests.append(req)
            alive.num_new_tokens.append(n)
            alive.samples.append(samples)
    return alive

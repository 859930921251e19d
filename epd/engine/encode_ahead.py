"""Encode ahead: an engine that holds the vision tower encodes a request's images beside its
steps, before the scheduler sees the request.

Why: encoding inside a step (`LocalEncoder.ensure`) makes every running decode wait for the
whole tower: three 1280x960 images take ~80-120 ms on an H200, 15-20 decode steps, and no token
budget can split it (BENCHMARKS.md, "Chunked prefill"). Here a thread encodes queued requests'
images on a CUDA stream of its own; the engine admits a request to the scheduler once its images
are in, and steps meanwhile (on the CPU the thread simply computes beside the engine). What the
thread fills is what `LocalEncoder.ensure` would have: `request.image_embeds`. `ensure` stays the
embedder, so an image not encoded ahead (one the prefix cache was expected to cover, then
evicted) is still encoded in the step, as before. The tokens are the same either way.

On by default where the tower runs on CUDA (`--no-encode-ahead`: in the steps). On one H200
(BENCHMARKS.md, "Encode ahead"), 32 decodes running and 4 requests of 3 x 1280x960 images
arriving at once, chunks of 2048: the decodes wait 48 ms a token during the burst against 98
encoded in the steps, the last request's first token comes 6% sooner, the first's 40% later (the
tower shares the GPU with the decodes). Before the engine read its samples without holding the
GIL (`DeviceSample.read`), this thread launched the eager tower only between steps, 4x slower,
and the burst's first tokens came 2-3x later.

The bookkeeping (`EncodeAhead`: the queue, the bound, what is done, cancellations) is apart from
what runs the tower (an `AheadTower`): `TowerThread` here, or the simulator's lane on virtual time
(epd.sim.tower_lane), so that `epd simulate` drives this same state machine.

A request's way through (engine thread unless marked):

| state    | held in                  | leaves when                                                  |
|----------|--------------------------|--------------------------------------------------------------|
| queued   | `_queued`                | room: in flight + encoded and waiting < the bound, or none   |
| encoding | the tower (`_in_flight`) | its images are encoded (the thread: and their event reached) |
| done     | the tower's finished     | `take_done` at the engine's next step: to the scheduler      |
| waiting  | the scheduler's queue    | its prefill starts (its embeddings are then the step's, as   |
|          |                          | any prefill's), or it ends                                   |

A cancelled request (aborted) is dropped wherever it is; one encoding is dropped when it ends.
The bound keeps embeddings of requests that wait for KV room from piling up: the scheduler
admits them no faster for being encoded.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from epd.engine.embedders import LocalEncoder
from epd.engine.request import Request
from epd.lifetime import Event
from epd.models.vision_graphs import VisionGraphs

DEFAULT_MAX_IMAGES_AHEAD = 8


@dataclass
class AheadJob:
    request: Request
    images: list[int]  # indices into request.prompt.images to encode
    error: str | None = None
    embeds: list[torch.Tensor] = field(default_factory=list)


class AheadTower(Protocol):
    """What runs the tower for `EncodeAhead`: it takes jobs one at a time, in order, and hands
    each back once its images are encoded (`embeds` filled, or `error` set). Called from the
    engine's thread only."""

    launch_seconds: float  # cumulative host time spent launching the tower (0: not measured)

    def put(self, job: AheadJob) -> None:
        """Encode `job`'s images after the jobs put before it."""
        ...

    def take_finished(self) -> list[AheadJob]:
        """The jobs finished since the last call, in order."""
        ...

    @property
    def num_finished(self) -> int:
        """Jobs finished and not taken yet."""
        ...

    def wait(self, timeout_s: float) -> None:
        """Block until a job finishes (or `wake`, or the timeout)."""
        ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


class EncodeAhead:
    def __init__(
        self,
        encoder: LocalEncoder,
        images_waiting: Callable[[], int],
        max_images: int = DEFAULT_MAX_IMAGES_AHEAD,
        tower_graphs: VisionGraphs | None = None,
        stream_priority: int = 0,
        tower: AheadTower | None = None,
    ) -> None:
        """`images_waiting`: the images encoded ahead whose requests the scheduler has not
        started (the engine counts them in its queue). `tower`: what encodes (default: a
        `TowerThread` of `encoder`, with `tower_graphs` and `stream_priority`, see there)."""
        self.encoder, self.max_images, self.tower_graphs = encoder, max_images, tower_graphs
        self.images_waiting = images_waiting
        self.tower = tower or TowerThread(encoder, tower_graphs, stream_priority)
        self._queued: deque[AheadJob] = deque()
        self._in_flight: dict[str, int] = {}  # request id -> images, put to the tower, not taken back
        self._cancelled: set[str] = set()
        self.num_images_encoded = 0  # cumulative, handed back by take_done (stats, tests)

    def submit(self, request: Request, images: list[int]) -> None:
        """Encode `images` (indices) of `request` ahead; `take_done` gives it back."""
        self._queued.append(AheadJob(request, images))
        self._feed()

    def take_done(self) -> list[AheadJob]:
        """The jobs encoded since the last call (failed ones carry `error`), less cancelled ones."""
        kept = []
        for job in self.tower.take_finished():
            rid = job.request.request_id
            self._in_flight.pop(rid, None)
            if rid in self._cancelled:
                self._cancelled.discard(rid)
                continue
            for i, emb in zip(job.images, job.embeds):
                job.request.image_embeds[i] = emb
            if job.error is None:
                self.num_images_encoded += len(job.images)
            kept.append(job)
        # Their requests reach the scheduler's queue only after this returns: counted as ahead
        # meanwhile, or the bound would let as many more in (all the queue, where the tower is fast).
        self._feed(handed_back=sum(len(job.images) for job in kept if job.error is None))
        return kept

    def cancel(self, request_id: str) -> None:
        before = len(self._queued)
        self._queued = deque(j for j in self._queued if j.request.request_id != request_id)
        if len(self._queued) == before and request_id in self._in_flight:
            self._cancelled.add(request_id)  # dropped when the tower hands it back

    @property
    def pending(self) -> int:
        """Requests submitted and not yet handed back by `take_done` (cancelled ones included
        while the tower still encodes them)."""
        return len(self._queued) + len(self._in_flight)

    @property
    def num_done(self) -> int:
        """Jobs the tower has finished that `take_done` has not taken yet."""
        return self.tower.num_finished

    @property
    def launch_seconds(self) -> float:
        """Cumulative seconds spent launching the tower (host): what a bench compares with the
        tower's GPU time, to tell a host-bound tower from a GPU-bound one."""
        return self.tower.launch_seconds

    def wait(self, timeout_s: float) -> None:
        """Block until a job is done (or `wake`, or the timeout)."""
        self.tower.wait(timeout_s)

    def wake(self) -> None:
        self.tower.wake()

    def close(self) -> None:
        self.tower.close()

    def _feed(self, handed_back: int = 0) -> None:
        """Hand queued jobs to the tower while the images ahead (`handed_back`: also those just
        taken back) stay within the bound; with none ahead, one job, however many images it has.
        (Not "one whenever none is in flight": requests encoded and waiting would then pile up
        past the bound, one job at a time, wherever the tower outruns the scheduler.)"""
        while self._queued:
            ahead = self._images_ahead() + handed_back
            if ahead and ahead >= self.max_images:
                return
            job = self._queued.popleft()
            self._in_flight[job.request.request_id] = len(job.images)
            self.tower.put(job)

    def _images_ahead(self) -> int:
        return self.images_waiting() + sum(self._in_flight.values())


class TowerThread:
    """An `AheadTower`: a thread that runs the tower, on a CUDA stream of its own where the
    encoder is on CUDA (else it simply computes beside the engine)."""

    def __init__(
        self, encoder: LocalEncoder, tower_graphs: VisionGraphs | None = None, stream_priority: int = 0
    ) -> None:
        """`tower_graphs`: replay the tower as CUDA graphs where it can (epd.models.vision_graphs;
        `--vision-cuda-graphs`): one launch a batch instead of the tower's Python dispatch.
        `stream_priority`: CUDA's, of the tower's stream (0 the steps' own; lower is sooner: its
        kernels go first where both wait)."""
        self.encoder, self.tower_graphs = encoder, tower_graphs
        device = encoder.device
        cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device, priority=stream_priority) if cuda else None
        # The engine's steps run on the stream current now (its thread's): the embeddings are
        # read there, so their memory must not be reused before those reads (record_stream).
        self._consumer = torch.cuda.current_stream(device) if cuda else None
        self._jobs: queue.SimpleQueue[AheadJob | None] = queue.SimpleQueue()
        self._done: deque[AheadJob] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self.launch_seconds = 0.0

    # ---- the engine's side --------------------------------------------------------------------

    def put(self, job: AheadJob) -> None:
        self._start_thread()
        self._jobs.put(job)

    def take_finished(self) -> list[AheadJob]:
        with self._lock:
            done, self._done = list(self._done), deque()
        return done

    @property
    def num_finished(self) -> int:
        with self._lock:
            return len(self._done)

    def wait(self, timeout_s: float) -> None:
        with self._lock:
            if not self._done:
                self._lock.wait(timeout_s)

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="encode-ahead", daemon=True)
            self._thread.start()

    # ---- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job.embeds = self._encode(job)
            except Exception as err:  # noqa: BLE001 - this request fails, the engine goes on
                job.error = f"encoding its images failed: {err}"
            with self._lock:
                self._done.append(job)
                self._lock.notify_all()

    def _encode(self, job: AheadJob) -> list[torch.Tensor]:
        encoder, req = self.encoder, job.request
        images = [req.prompt.images[i] for i in job.images]
        started = encoder.clock.now()
        for i in job.images:
            req.record(Event.ENCODE_START, started, encoder.instance, i)
        launched = time.perf_counter()
        if self._stream is None:
            embeds = encoder.encode(images)
        else:
            with torch.cuda.stream(self._stream):
                embeds = encoder.encode(images, self.tower_graphs)
                if self.tower_graphs is not None:  # a replay's output is its graph's buffer
                    embeds = [emb.clone() for emb in embeds]
                done = torch.cuda.Event()
                done.record(self._stream)
            self.launch_seconds += time.perf_counter() - launched
            done.synchronize()  # this thread only (the GIL is let go meanwhile)
            for emb in embeds:
                emb.record_stream(self._consumer)
        ended = encoder.clock.now()
        for i in job.images:
            req.record(Event.ENCODE_END, ended, encoder.instance, i)
        return embeds

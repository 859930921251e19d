"""The encode stage of an encoder-only instance: batches images, caches and ships embeddings.

Per image (content hash) the worker does the least work it can:
  cached here      -> pin and send again, no encoding (an image seen before);
  being encoded    -> add the destination to that job (two requests, one encoding);
  otherwise        -> queue a job, and start making its patches: an image that came as a file is
                      decoded, resized and patchified on the instance's PatchPool threads;
                      encode it once they are made and the MM cache can reserve room for it.
A batch takes queued jobs whose patches are made, in the order of the queue policy (arrival by
default; epd.engine.queue_policy: a job is as urgent as its most urgent waiting request), up to the
patch budget; one still decoding is passed over, not waited for. A file that cannot be decoded
fails the requests that wait for it (`EncodeFailed`: the router answers 400).
A chunk of a video (IRP over its frames: epd.inputs.video_chunks) is one more image here, keyed by
its chunk key; where the video came as a file, only the chunk's frames are made into patches
(decoding still runs from the file's start up to the chunk's last frame: no frame-exact seeking).
The temporal groups of a Qwen3-VL video file are items of their own: those one task brings are
made from one decode of the file (epd.cluster.pixel_decoder), the file's bytes sent once.
On a GPU nothing waits for the device between batches: a batch's upload (from pinned memory,
filled on the pool's thread), tower, cache write and sends are queued on the stream at once, and
its completion is read from an event later (`_InFlight`), so the host launches batch n+1 while
the GPU still runs batch n; the worker waits only when it has nothing else to launch or two
batches are in flight already. Its reports (`EncodeDone`, the ENCODE_END time) come when the
event fired: the sends, stream-ordered after the tower, may go before.

    queued --patches made, budget, cache room--> launched (in flight) --event fired--> reported

Each sent copy holds one pin on the cache entry until the consumer confirms receipt
(`release`): the cache is the transfer buffer, and a full cache stops admission
(back-pressure) instead of growing. A consumer that dies confirms nothing: `dest_gone` drops what
was still to go there and unpins the copies it never confirmed (the chaos soak saw them pinned
for ever, one more with each prefill instance that died).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from epd.clock import WALL_CLOCK, Clock
from epd.cluster.messages import EncodeDone, EncodeFailed, EncodeItem, EncodeTask
from epd.cluster.pixel_decoder import PixelDecoder
from epd.device_clock import DeviceClock
from epd.engine.mm_cache import MMCache
from epd.engine.queue_policy import FCFS, QueuePolicy, Urgency
from epd.inputs.errors import InvalidInputError
from epd.lifetime import Event, LifetimeEvent
from epd.models.vision_graphs import VisionGraphs
from epd.transfer.base import Connector

logger = logging.getLogger(__name__)


@dataclass
class _Waiter:
    request_id: str
    index: int
    dest: str
    key: str  # the item's content hash (a video chunk's key), reported back with its index
    joined: bool = False  # rode along on another request's encoding of the same image
    urgency: Urgency | None = None  # None: an old router's task, served in arrival order


@dataclass
class _Job:
    content_hash: str
    item: EncodeItem
    num_tokens: int
    patches: Future[torch.Tensor]  # uint8, made in the instance's PatchPool
    waiters: list[_Waiter] = field(default_factory=list)
    received: float = 0.0  # when its task arrived here (the clock's now)
    ready: float | None = None  # when its patches were made (set from the pool's thread)


@dataclass
class _InFlight:
    """A launched batch: its GPU work queued, its reports held until `done` fires."""

    batch: list[_Job]
    start: float  # the clock's time at the launch (off the GPU: the encode's start)
    encoded_at: float = 0.0  # off the GPU: the clock's time once the tower returned
    began: torch.cuda.Event | None = None  # on the GPU: where its work begins on the stream,
    encoded: torch.cuda.Event | None = None  # where the tower ends (before the writes and sends),
    done: torch.cuda.Event | None = None  # and where all of it ends (None off the GPU)


MAX_IN_FLIGHT = 2  # batches queued on the GPU at once: enough to hide one launch behind the other


class EncoderWorker:
    def __init__(
        self,
        model: torch.nn.Module,
        cache: MMCache,
        connector: Connector,
        device: torch.device,
        instance: str,
        decode_pixels: PixelDecoder,
        max_batch_patches: int = 16384,
        clock: Clock = WALL_CLOCK,
        queue_policy: QueuePolicy = FCFS,
        vision_graphs: bool = False,
    ) -> None:
        """`vision_graphs`: replay the tower as CUDA graphs where it can (epd.models.vision_graphs)."""
        self.clock, self.queue_policy = clock, queue_policy
        self.model, self.cache, self.connector, self.decode_pixels = model, cache, connector, decode_pixels
        self.device, self.instance, self.max_batch_patches = device, instance, max_batch_patches
        self.merge = model.config.vision.spatial_merge_size**2
        self.queue: OrderedDict[str, _Job] = OrderedDict()  # waiting for room or their turn
        self.done: list[EncodeDone | EncodeFailed] = []
        self.in_flight: deque[_InFlight] = deque()
        self.num_encoded = 0
        self.phase_s: Counter[str] = Counter()  # host seconds by phase: expand, launch, wait
        self.device_clock = DeviceClock(clock, device) if device.type == "cuda" else None
        self.tower_graphs = (
            VisionGraphs.for_model(model, max_batch_patches, device) if vision_graphs else None
        )
        self.unconfirmed: Counter[tuple[str, str]] = Counter()  # (hash, dest) -> copies sent, pinned

    def has_work(self) -> bool:
        """Whether a step would do something: an image whose patches are made (or failed), or a
        batch in flight to report."""
        return bool(self.in_flight) or any(job.patches.done() for job in self.queue.values())

    @property
    def queued_patches(self) -> int:
        return sum(job.num_tokens * self.merge for job in self.queue.values())

    def add(self, task: EncodeTask) -> None:
        hits, hit_keys, events = [], [], []
        new: dict[str, tuple[EncodeItem, list[_Waiter]]] = {}  # to encode: made into patches below
        for item in task.items:
            waiter = _Waiter(task.request_id, item.index, task.dest, item.content_hash, urgency=task.urgency)
            if self.cache.lookup(item.content_hash):
                self.cache.pin(item.content_hash)
                # Timed before the send: the consumer may record its arrival before this returns.
                start = LifetimeEvent.now(self.clock, Event.MM_TRANSFER_START, self.instance, item.index)
                events.append(start)
                self._send(item.content_hash, [waiter])
                hits.append(item.index)
                hit_keys.append(item.content_hash)
            elif item.content_hash in self.queue:
                waiter.joined = True
                self.queue[item.content_hash].waiters.append(waiter)
            elif item.content_hash in new:  # twice in this task
                waiter.joined = True
                new[item.content_hash][1].append(waiter)
            else:
                new[item.content_hash] = (item, [waiter])
        if new:
            self._queue_jobs(list(new.values()))
        if hits:
            self.done.append(EncodeDone(self.instance, task.request_id, hits, hits, events, hit_keys))

    def _queue_jobs(self, new: list[tuple[EncodeItem, list[_Waiter]]]) -> None:
        """Queue a job per new item; their patches are made at once, off this thread, the items
        together (a Qwen3-VL file's groups: one decode of the file, epd.cluster.pixel_decoder)."""
        received = self.clock.now()
        made = self.decode_pixels.patches_of([item for item, _ in new])
        for (item, waiters), patches in zip(new, made, strict=True):
            grid_tokens = item.grid[0] * item.grid[1] * item.grid[2] // self.merge
            job = _Job(item.content_hash, item, grid_tokens, patches, waiters, received)
            patches.add_done_callback(lambda _, job=job: setattr(job, "ready", self.clock.now()))
            self.queue[item.content_hash] = job

    def step(self) -> list[EncodeDone | EncodeFailed]:
        """Launch what fits (patch budget, cache room) and ship it; report the batches the device
        has finished; return the reports. Waits for the device only when there is nothing else to
        launch, or `MAX_IN_FLIGHT` batches are queued on it already."""
        self._finish(wait=len(self.in_flight) >= MAX_IN_FLIGHT)
        batch = self._take_batch()
        if batch:
            self._launch(batch)
        self._finish(wait=not batch)
        done, self.done = self.done, []
        return done

    def _take_batch(self) -> list[_Job]:
        """Jobs in the policy's order whose patches are made, within the patch budget and cache
        room. One still decoding is passed over, not waited for; one that failed is reported."""
        batch, patches = [], 0
        for content_hash, job in self._in_order():
            if not job.patches.done():
                continue
            if job.patches.exception() is not None:
                del self.queue[content_hash]
                self._report_failure(job, job.patches.exception())
                continue
            job_patches = job.num_tokens * self.merge
            if batch and patches + job_patches > self.max_batch_patches:
                break
            if not self.cache.reserve(content_hash, job.num_tokens):
                break  # back-pressure: wait until consumers release entries
            del self.queue[content_hash]
            batch.append(job)
            patches += job_patches
        return batch

    def _in_order(self) -> list[tuple[str, _Job]]:
        """The queue in the order the policy serves it (a stable sort: ties keep arrival order)."""
        jobs = list(self.queue.items())
        if not self.queue_policy.reorders:
            return jobs
        now = self.clock.now()
        return sorted(jobs, key=lambda entry: self._job_key(entry[1], now))

    def _job_key(self, job: _Job, now: float) -> tuple[float, ...]:
        patches = job.num_tokens * self.merge
        keys = [self.queue_policy.key(w.urgency or Urgency(now), now, patches=patches) for w in job.waiters]
        return min(keys)

    def _launch(self, batch: list[_Job]) -> None:
        """Queue the batch's upload, tower, cache writes and sends on the device; record its end."""
        flight = _InFlight(batch, self.clock.now())
        if self.device_clock is not None:
            if not self.in_flight:
                self.device_clock.anchor_now()  # nothing of ours is queued: the stream is idle
            flight.began = self.device_clock.mark()
        pixels = torch.cat([self.decode_pixels.expand(job.patches.result()) for job in batch])
        expanded = self.clock.now()
        with torch.inference_mode():
            grids = [job.item.grid for job in batch]
            if self.tower_graphs is None:
                embeds = self.model.encode_images(pixels, grids)
            else:  # a replay's output lives until the next: the writes and sends below come first
                embeds = self.model.encode_images(pixels, grids, self.tower_graphs)
        launched = flight.encoded_at = self.clock.now()
        if self.device_clock is not None:  # the encode's end: the sends below may land before `done`
            flight.encoded = self.device_clock.mark()
        for job, emb in zip(batch, embeds):
            self.cache.write(job.content_hash, emb)
            for _ in job.waiters[1:]:
                self.cache.pin(job.content_hash)  # one pin per destination copy
            self._send(job.content_hash, job.waiters)
        if self.device_clock is not None:
            flight.done = self.device_clock.mark()
        self.in_flight.append(flight)
        self.phase_s["expand"] += expanded - flight.start
        self.phase_s["launch"] += launched - expanded
        if logger.isEnabledFor(logging.DEBUG):
            _log_launch(batch, flight.start, expanded, launched)

    def _finish(self, wait: bool) -> None:
        """Report the in-flight batches whose device work is done, oldest first; with `wait`,
        block (the GIL released) until the oldest is done. On a GPU the encode's start and end
        are when the stream reached them (`DeviceClock`), not when the host launched or saw them:
        the launch returns long before the work (a 4-image 1344 px batch: 23 ms encode, which
        showed up as 130 ms of "mm_transfer" when reported at the launch)."""
        while self.in_flight:
            flight = self.in_flight[0]
            if flight.done is not None and not flight.done.query():
                if not wait:
                    return
                before = self.clock.now()
                flight.done.synchronize()
                self.phase_s["wait"] += self.clock.now() - before
            wait = False  # one wait at most: the rest are reported when they are done
            self.in_flight.popleft()
            start_time, end_time = self._times(flight)
            start = LifetimeEvent(Event.ENCODE_START, start_time, self.instance)
            end = LifetimeEvent(Event.ENCODE_END, end_time, self.instance)
            self.num_encoded += len(flight.batch)
            for job in flight.batch:
                self._report(job, start, end)

    def _times(self, flight: _InFlight) -> tuple[float, float]:
        """(start, end) of a finished batch's encode on the clock."""
        if self.device_clock is None or flight.began is None or flight.encoded is None:
            return flight.start, flight.encoded_at  # before the sends: P may record arrivals at once
        return self.device_clock.time_of(flight.began), self.device_clock.time_of(flight.encoded)

    def _send(self, content_hash: str, waiters: list[_Waiter]) -> None:
        embeds = self.cache.get(content_hash)
        for w in waiters:
            self.unconfirmed[(content_hash, w.dest)] += 1
            meta = {"content_hash": content_hash, "source": self.connector.address}
            self.connector.send(w.dest, f"mm:{content_hash}", {"embeds": embeds}, meta)

    def _report(self, job: _Job, start: LifetimeEvent, end: LifetimeEvent) -> None:
        by_request: dict[str, list[_Waiter]] = {}
        for w in job.waiters:
            by_request.setdefault(w.request_id, []).append(w)
        for request_id, waiters in by_request.items():
            events = []
            for w in waiters:
                events += [
                    LifetimeEvent(Event.ENCODE_START, start.time, self.instance, w.index),
                    LifetimeEvent(Event.ENCODE_END, end.time, self.instance, w.index),
                    LifetimeEvent(Event.MM_TRANSFER_START, end.time, self.instance, w.index),
                ]
            joined = [w.index for w in waiters if w.joined]
            items, keys = [w.index for w in waiters], [w.key for w in waiters]
            self.done.append(EncodeDone(self.instance, request_id, items, joined, events, keys))

    def _report_failure(self, job: _Job, error: BaseException) -> None:
        if not isinstance(error, InvalidInputError):
            raise error  # a bug, not a bad file: let the instance fail loudly
        by_request: dict[str, list[_Waiter]] = {}
        for w in job.waiters:
            by_request.setdefault(w.request_id, []).append(w)
        for request_id, waiters in by_request.items():
            indices, keys = [w.index for w in waiters], [w.key for w in waiters]
            message = f"image {indices[0]}: {error}"
            self.done.append(EncodeFailed(self.instance, request_id, indices, message, keys))

    def release(self, content_hash: str, dest: str) -> None:
        """`dest` has its copy: one pin less (none if `dest_gone` released it already)."""
        key = (content_hash, dest)
        if self.unconfirmed[key] > 0:
            self.unconfirmed[key] -= 1
            self.cache.unpin(content_hash)
        if not self.unconfirmed[key]:
            del self.unconfirmed[key]

    def dest_gone(self, dest: str) -> None:
        """`dest` died: nothing more goes there, and the copies it never confirmed are unpinned."""
        for content_hash, job in list(self.queue.items()):
            job.waiters = [w for w in job.waiters if w.dest != dest]
            if not job.waiters:
                del self.queue[content_hash]  # queued jobs hold no cache entry yet
        for (content_hash, to), copies in list(self.unconfirmed.items()):
            if to == dest:
                del self.unconfirmed[(content_hash, to)]
                for _ in range(copies):
                    self.cache.unpin(content_hash)


def _log_launch(batch: list[_Job], start: float, expanded: float, launched: float) -> None:
    """Where a batch's host time went (EPD_LOG_LEVEL=debug): per image, from its task's arrival to
    its patches and to the batch's start; then the batch's upload and expansion, and its launch
    (the device's own time shows as ENCODE_END - ENCODE_START in the request's timings)."""
    ms = [
        f"{job.content_hash[:10]} patches {_ms(job.received, job.ready)} queued {_ms(job.received, start)}"
        for job in batch
    ]
    logger.debug(
        "encode batch of %d: %s; expand %s, launch %s",
        len(batch), "; ".join(ms), _ms(start, expanded), _ms(expanded, launched),
    )  # fmt: skip


def _ms(since: float, until: float | None) -> str:
    return "-" if until is None else f"{(until - since) * 1e3:.1f} ms"

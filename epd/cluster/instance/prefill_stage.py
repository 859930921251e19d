"""The prefill stage: takes `PrefillTask`s, waits for their images' embeddings, admits, hands KV off.

The router sends a request's images to the encoders when it sends the task, and lists them in
the task (`encoding`): one transfer of each is on its way here. The stage counts transfers per
content hash, so it knows whether one is still to come:

| event                                  | counts                                               |
|----------------------------------------|------------------------------------------------------|
| a task lists image h (`encoding`)      | an early arrival of h was its transfer: use it up;   |
|                                        | else `announced[h] += 1`                             |
| the stage asks for h (`NeedEmbeddings`)| `announced[h] += 1`                                  |
| h arrives (`mm:<h>`)                   | `announced[h] -= 1`; none announced: it came before  |
|                                        | its task, `unannounced[h] += 1`                      |
| h is lost (`EmbeddingsLost`: its       | `announced[h] -= 1`; if none is left on its way and  |
| encoder died)                          | requests wait for h: ask again for the first of them |

Then per image of a task, the least it can do:
  in the MM cache                  -> pin it for the request;
  not cached, announced[h] > 0     -> wait for that arrival (two requests, one transfer);
  otherwise                        -> wait, and ask the router for it (`NeedEmbeddings`): the
                                      router thought it was here, but it was evicted meanwhile.
Evictions are reported (`EmbeddingsEvicted`) so that the router's view catches up.
A video the router split over several encoders (IRP over its frames) arrives in chunks, one
transfer each (`mm:<h>#groups=a-b/t`): each is reported (its encoder's pin is released), and the
last one to complete the video counts as the arrival of h above (video_assembly.py). So every
count in the table is per whole image or video: one "transfer" of h is a full set of its chunks.
A request is admitted to the engine once every image is pinned for it, and unpins them at its
first token (the request holds its own copies then). A full cache pushes back instead of failing:
an image that arrives with every block pinned is dropped and asked for again at the next unpin of
an admitted request; if no admitted request holds pins (all belong to requests still waiting
here), the newest waiting request gives its images back, so the oldest complete first and the
cache cannot deadlock. Only a request whose images exceed the whole cache is refused (a 400).
Without an MM cache (EP) the engine encodes the task's images itself: the task is admitted once
the instance's `PatchPool` has made their patches from the files (in arrival order among those
ready; a bad file fails the request, a 400). Where the KV goes after the first token is the
engine's wiring (engine_host); this stage tells the `KVSender` each request's D.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from epd.clock import Clock
from epd.cluster.instance.engine_host import EngineHost
from epd.cluster.instance.stage import Outbox, StageManager
from epd.cluster.instance.task_prompt import prompt_from_task
from epd.cluster.instance.video_assembly import VideoAssembly
from epd.cluster.kv_handoff import KVSender
from epd.cluster.messages import (
    EmbeddingArrived,
    EmbeddingsEvicted,
    EmbeddingsLost,
    NeedEmbeddings,
    PrefillTask,
    RequestError,
)
from epd.cluster.pixel_decoder import PixelDecoder
from epd.cluster.stats import mm_cache_stats
from epd.engine.mm_cache import MMCache
from epd.engine.request import Request
from epd.inputs.errors import InvalidInputError
from epd.inputs.types import ProcessedPrompt
from epd.inputs.video_chunks import VideoChunk, parse_chunk_key
from epd.lifetime import Event, LifetimeEvent
from epd.transfer.base import Received
from epd.transfer.retry import connector_stats

MM_CACHE_FULL = "the MM cache of this prefill instance is full (raise mm_cache_bytes)"


@dataclass
class _MakingPatches:
    """An EP task whose images' patches are being made from their files."""

    task: PrefillTask
    patches: list[Future[torch.Tensor]]

    def ready(self) -> bool:
        return all(f.done() for f in self.patches)


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
        self.making: dict[str, _MakingPatches] = {}  # EP: request id -> its images being decoded
        self.waiting_on: dict[str, list[str]] = {}  # content hash -> request ids
        self.announced: Counter[str] = Counter()  # hash -> transfers on their way (module docstring)
        self.unannounced: Counter[str] = Counter()  # hash -> arrivals before the task that lists them
        # request id -> hashes it pins in the MM cache, in pin order (a dict, not a set: the order
        # of unpinning is the MM cache's LRU order, which must not hang on string hashing)
        self.held: dict[str, dict[str, None]] = {}
        self.evicted: list[str] = []
        # Images that found no room (module docstring): asked for again at the next unpin.
        self.parked: dict[str, None] = {}
        self.assembly = VideoAssembly()  # chunks of videos encoded on several encoders (IRP)
        if mm_cache is not None:
            mm_cache.on_evict = self.evicted.append

    def on_message(self, msg: object) -> None:
        if isinstance(msg, PrefillTask):
            self._prefill_task(msg)
        elif isinstance(msg, EmbeddingsLost):
            for content_hash in msg.content_hashes:
                self._lost(content_hash)

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
        """Whether the request waits here for embeddings or patches (the engine has not seen it yet)."""
        return request_id in self.pending or request_id in self.making

    def step(self) -> None:
        self._admit_made()

    def has_work(self) -> bool:
        return any(making.ready() for making in self.making.values())

    def abort(self, request_id: str) -> None:
        self.making.pop(request_id, None)
        pending = self.pending.pop(request_id, None)
        if pending is not None:
            for h in pending.missing:
                if request_id in self.waiting_on.get(h, []):
                    self.waiting_on[h].remove(request_id)
        if self.mm_cache is not None:
            self._unpin_images(request_id)
        self.kv_sender.forget(request_id)

    def busy_requests(self) -> int:
        # A transfer on its way that no request here waits for (its request was aborted) counts
        # too: the stage must be here to take it, or the counts of the next one would be off.
        in_flight = len([h for h in self.announced if h not in self.waiting_on]) + len(self.unannounced)
        held = set(self.pending) | set(self.making) | set(self.held) | set(self.kv_sender.dest)
        return len(held) + in_flight

    def stats(self) -> dict[str, float]:
        # With the retries of the connector its KV goes out through (epd.transfer.retry).
        return {**mm_cache_stats(self.mm_cache), **connector_stats(self.kv_sender.connector)}

    # ---- tasks and embeddings ------------------------------------------------------------------

    def _prefill_task(self, task: PrefillTask) -> None:
        for index in task.encoding:  # first: their transfers come whatever happens to the task
            self._announce(task.image_hashes[index])
        try:
            self.llm.engine.check_fits(len(task.prompt_token_ids))
        except ValueError as err:
            self.outbox.send(RequestError(self.instance_id, task.request_id, str(err)))
            return
        if task.decode_dest is not None:
            self.kv_sender.route(task.request_id, task.decode_dest)
        if self.mm_cache is None:  # encodes in-process, once the patches are made
            patches = self.decode_pixels.patches_of(task.pixels or [])  # a file's groups: one decode
            self.making[task.request_id] = _MakingPatches(task, patches)
            self._admit_made()
            return
        too_many = self._blocks_beyond_cache(task)
        if too_many:
            self.outbox.send(RequestError(self.instance_id, task.request_id, too_many, invalid_input=True))
            return
        prompt = prompt_from_task(task)
        missing = self._pin_or_wait(task)
        if missing:
            self.pending[task.request_id] = _Pending(task, prompt, missing)
        else:
            self._admit(task, prompt)

    def _blocks_beyond_cache(self, task: PrefillTask) -> str | None:
        """Why the task's images cannot all be in the MM cache at once, even empty; else None."""
        lengths = {h: n for h, (_, n) in zip(task.image_hashes, task.placeholders)}
        need = sum(self.mm_cache.blocks_needed(n) for n in lengths.values())
        if need <= self.mm_cache.num_blocks:
            return None
        return (
            f"the request's images need {need} blocks of this prefill instance's MM cache, which "
            f"holds {self.mm_cache.num_blocks} (fewer or smaller images, or a larger --mm-cache-bytes)"
        )

    def _announce(self, content_hash: str) -> None:
        if self.unannounced[content_hash] > 0:
            _decrement(self.unannounced, content_hash)
        else:
            self.announced[content_hash] += 1

    def _pin_or_wait(self, task: PrefillTask) -> set[str]:
        """Pin the task's cached images; the hashes still missing (asked of the router if none is
        on its way)."""
        missing, need = set(), []
        held = self.held.setdefault(task.request_id, {})
        for i, h in enumerate(task.image_hashes):
            if h in held or h in missing:
                continue
            if self.mm_cache.lookup(h):
                self.mm_cache.pin(h)
                held[h] = None
                continue
            missing.add(h)
            self.waiting_on.setdefault(h, []).append(task.request_id)
            if self.announced[h] == 0:
                self.announced[h] += 1
                need.append(i)
        if need:
            self.outbox.send(NeedEmbeddings(self.instance_id, task.request_id, need))
        return missing

    def _embedding_arrived(self, received: Received) -> None:
        key, source = received.meta["content_hash"], received.meta["source"]
        embeds = received.tensors["embeds"]
        chunk = parse_chunk_key(key)
        if chunk is None:
            self._arrived(key, embeds, key, source)
            return
        video = self._join(chunk, embeds)
        if video is None:  # more chunks to come: the router releases this one at its encoder
            self.outbox.send(EmbeddingArrived(self.instance_id, key, source, []))
        else:
            self._arrived(chunk.video_key, video, key, source)

    def _join(self, chunk: VideoChunk, embeds: torch.Tensor) -> torch.Tensor | None:
        """The whole video's rows once this chunk completes it (video_assembly.py), else None. A
        chunk of a video cached here that no transfer is announced for is one sent again after
        the video was joined (its encoder was thought lost): nothing to join."""
        if chunk.video_key in self.mm_cache and self.announced[chunk.video_key] == 0:
            return None
        return self.assembly.add(chunk, embeds)

    def _arrived(self, h: str, embeds: torch.Tensor, key: str, source: str) -> None:
        """Image (or video) `h` is here, the transfer `key` from `source` (a chunk's, for a video
        joined from chunks) bringing its last part."""
        self.assembly.discard(h)  # chunks sent before it came whole (asked again after a loss)
        waiters = self.waiting_on.pop(h, [])
        if self.announced[h] > 0:
            _decrement(self.announced, h)
        else:
            self.unannounced[h] += 1
        end = Event.MM_TRANSFER_END
        events = [(rid, LifetimeEvent.now(self.clock, end, self.instance_id)) for rid in waiters]
        self.outbox.send(EmbeddingArrived(self.instance_id, key, source, events))
        stored = self.mm_cache.put(h, embeds)
        self._report_evictions([] if stored else [h])
        if not stored:
            self._no_room(h, embeds.shape[0], waiters)
            return
        self._give_to_waiters(h, waiters)
        self.mm_cache.unpin(h)  # the arrival's own pin: the waiters hold theirs

    def _give_to_waiters(self, h: str, waiters: list[str]) -> None:
        """Pin cached image `h` for each waiting request; admit those that now have every image."""
        for rid in waiters:
            pending = self.pending.get(rid)
            if pending is None or h in self.held.get(rid, {}):
                continue  # aborted meanwhile, or listed twice
            self.mm_cache.pin(h)
            self.held.setdefault(rid, {})[h] = None
            pending.missing.discard(h)
            if not pending.missing:
                del self.pending[rid]
                self._admit(pending.task, pending.prompt)

    def _no_room(self, content_hash: str, num_tokens: int, waiters: list[str]) -> None:
        """An image arrived with every block of the cache pinned. Its requests wait (back-pressure):
        it is asked for again when a request admitted to the engine passes its first token and
        unpins its images. If none holds pins (all belong to requests still waiting here), the
        newest of those gives its images back (asked for again later) and the image is asked for
        again at once: the oldest requests complete first, so the cache cannot deadlock."""
        waiters = [rid for rid in waiters if rid in self.pending]
        if self.mm_cache.blocks_needed(num_tokens) > self.mm_cache.num_blocks:
            for rid in waiters:  # it would not fit an empty cache
                self._fail(rid, MM_CACHE_FULL)
            return
        if not waiters:
            return
        self.waiting_on.setdefault(content_hash, []).extend(waiters)
        if any(rid not in self.pending for rid, pins in self.held.items() if pins):
            self.parked[content_hash] = None  # an admitted request will unpin
            return
        victim = next((rid for rid in reversed(self.pending) if self.held.get(rid)), None)
        if victim is not None:
            self._give_back_images(victim)
        self._ask_again(content_hash)

    def _give_back_images(self, request_id: str) -> None:
        """A waiting request unpins what it holds; those images are asked for again later."""
        pending = self.pending[request_id]
        for h in self.held.pop(request_id, {}):
            self.mm_cache.unpin(h)
            pending.missing.add(h)
            self.waiting_on.setdefault(h, []).append(request_id)
            self.parked[h] = None

    def _ask_parked(self) -> None:
        for content_hash in list(self.parked):
            del self.parked[content_hash]
            self._ask_again(content_hash)

    def _ask_again(self, content_hash: str) -> None:
        """Give the waiters an image that found no room before: from the cache if it is still
        there, else asked of the router (one request for all of them)."""
        waiters = [rid for rid in self.waiting_on.get(content_hash, []) if rid in self.pending]
        if not waiters or self.announced[content_hash] > 0:
            return  # nobody waits any more, or a transfer of it is on its way
        if self.mm_cache.lookup(content_hash):
            del self.waiting_on[content_hash]
            self._give_to_waiters(content_hash, waiters)
            return
        self.announced[content_hash] += 1
        first = self.pending[waiters[0]].task
        index = first.image_hashes.index(content_hash)
        self.outbox.send(NeedEmbeddings(self.instance_id, first.request_id, [index]))

    def _lost(self, content_hash: str) -> None:
        self.assembly.discard(content_hash)  # a video's chunks: they are all sent again if asked
        if self.announced[content_hash] > 0:
            _decrement(self.announced, content_hash)
        waiters = self.waiting_on.get(content_hash)
        if self.announced[content_hash] > 0 or not waiters:
            return
        self.announced[content_hash] += 1
        first = self.pending[waiters[0]].task  # the router sends it for this request; all get it
        index = first.image_hashes.index(content_hash)
        self.outbox.send(NeedEmbeddings(self.instance_id, first.request_id, [index]))

    def _report_evictions(self, not_stored: list[str]) -> None:
        """What the MM cache dropped to make room (and an arrival it had no room for)."""
        gone = self.evicted + not_stored
        self.evicted.clear()
        if gone:
            self.outbox.send(EmbeddingsEvicted(self.instance_id, gone))

    def _admit(self, task: PrefillTask, prompt: ProcessedPrompt) -> None:
        earlier = task.output_token_ids  # a continuation: what it produced before
        self.llm.engine.add_request(task.request_id, prompt, task.params, task.arrival_time, earlier)
        if earlier:
            self.llm.continues_at(task.request_id, len(earlier))  # reported by an earlier attempt

    def _admit_made(self) -> None:
        """Admit the EP tasks whose patches are all made; fail those with a bad image file."""
        for request_id, making in list(self.making.items()):
            if not making.ready():
                continue
            del self.making[request_id]
            errors = [f.exception() for f in making.patches if f.exception() is not None]
            if errors:
                self._fail(request_id, _input_error(errors[0]), invalid_input=True)
                continue
            pixels = [self.decode_pixels.expand(f.result()) for f in making.patches]
            self._admit(making.task, prompt_from_task(making.task, pixels))

    def _unpin_images(self, request_id: str) -> None:
        held = self.held.pop(request_id, ())
        for h in held:
            self.mm_cache.unpin(h)
        if held and self.parked:
            self._ask_parked()  # room, maybe, for images that found none

    def _fail(self, request_id: str, error: str, invalid_input: bool = False) -> None:
        self.abort(request_id)
        self.llm.abort(request_id)
        self.outbox.send(RequestError(self.instance_id, request_id, error, invalid_input))


def _input_error(error: BaseException) -> str:
    if not isinstance(error, InvalidInputError):
        raise error  # a bug, not a bad file: let the instance fail loudly
    return str(error)


def _decrement(counts: Counter[str], key: str) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]

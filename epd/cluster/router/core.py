"""The router core: every request's lifecycle as a pure state machine (no sockets, time from a Clock).

    add_request --PrefillTask--> P, and --EncodeTask(s)--> E(s) for the images P does not hold
    E --embeddings (connector)--> P --EmbeddingArrived--> router --ReleaseEmbedding--> E
    P --first token (RequestUpdate)--> router;  P --KV (connector)--> D --tokens--> router

The images go to the encoders when the request arrives, in parallel with its task to P: the
router keeps a view of what each P holds (`held_embeddings.py`, from P's reports). Where the view
was stale (P evicted an image meanwhile), P asks for it (`NeedEmbeddings`) and the router sends it
then.

Each call (`add_request`, `abort`, `handle` a message, `tick` for liveness) returns the messages to
send as `Outgoing(instance, message)`; outputs of the requests that advanced pile up until
`take_outputs`. A shell (`shell.Router`) delivers both; tests drive the core by hand.

What it leaves to others, and what it keeps:
- A request's stages: `lifecycle.py` (the table of stages and transitions).
- Where work goes: `placement.py` (least-loaded P, D kept on a P that decodes, IRP spread of images
  over encoders with cache affinity, a video's temporal groups in chunks over several encoders:
  `encode_units.py`). Every part of a request goes to its one P, which joins them.
- What each instance holds: `ledger.py`, one reservation per piece of work, reserved when sent,
  released when done; a request that ends releases whatever it still holds.
- A dead instance fails the requests holding work on it, with the reason; the rest carry on.
- Roles an instance reports (`SetRolesReply`) replace those it started with; its name stays.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from epd.clock import WALL_CLOCK, Clock
from epd.cluster.layout import InstanceSpec, Role
from epd.cluster.messages import (
    AbortRequest,
    DestinationGone,
    EmbeddingArrived,
    EmbeddingNotSent,
    EmbeddingsEvicted,
    EmbeddingsLost,
    EncodeDone,
    EncodeFailed,
    EncodeItem,
    EncodeTask,
    InstanceFailed,
    InstanceReady,
    InstanceStats,
    NeedEmbeddings,
    PrefillTask,
    ReleaseEmbedding,
    RequestError,
    RequestUpdate,
    SetRolesReply,
    ToInstance,
)
from epd.cluster.router.encode_units import encode_item, encode_units, work_item
from epd.cluster.router.held_embeddings import HeldEmbeddings
from epd.cluster.router.ledger import LoadLedger, Work
from epd.cluster.router.lifecycle import IllegalTransition, RequestRecord, Trigger
from epd.cluster.router.placement import EncodeAffinity, ImageToEncode, Placement, RequestToPlace
from epd.cluster.router.recovery import (
    MAX_ATTEMPTS,
    Recovery,
    recovery_after_transfer,
    recovery_for,
    transfer_gave_up,
)
from epd.engine.queue_policy import DEFAULT_TOKEN_S, Urgency
from epd.inputs.types import ProcessedPrompt
from epd.inputs.video_chunks import item_key
from epd.lifetime import Event, LifetimeEvent
from epd.outputs import RequestMetrics, RequestOutput
from epd.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# The ledger's item of a decode a role switch moves off its instance (role_switch.py): held there,
# next to the decode reserved on the new D, until the new D reports a token (the KV has landed).
MIGRATION_SOURCE = 1


@dataclass
class InstanceHandle:
    """What the router knows of one instance: its spec, its ready report, and whether it lives.

    `is_alive` asks the instance's launcher (epd.cluster.launcher) whether it runs; `tick` reads
    it. `spec.roles` are the roles it holds now (they may change: `SetRolesReply`); `name` never
    changes.
    """

    spec: InstanceSpec
    ready: InstanceReady
    is_alive: Callable[[], bool]
    alive: bool = True
    last_heard: float = 0.0  # clock.monotonic() of its last message (or of its handle's creation)
    started_as: InstanceSpec | None = None  # the spec it starts with (again, when restarted)

    def __post_init__(self) -> None:
        self.started_as = self.started_as or self.spec

    @property
    def name(self) -> str:
        return self.spec.name

    def has(self, role: Role) -> bool:
        return role in self.spec.roles


class Outgoing(NamedTuple):
    instance: str
    message: ToInstance


class RouterCore:
    def __init__(
        self,
        instances: list[InstanceHandle],
        clock: Clock = WALL_CLOCK,
        placement: Placement | None = None,
        silence_timeout_s: float | None = None,
    ) -> None:
        """`silence_timeout_s`: an instance that sends nothing for that long is taken for dead
        (instances report stats every 0.25 s while their loop runs); None: only its launcher says."""
        self.clock = clock
        self.silence_timeout_s = silence_timeout_s
        self.placement = placement or Placement()
        self.ledger = LoadLedger()
        self.affinity = EncodeAffinity()
        self.held = HeldEmbeddings()
        self.instances = {h.name: h for h in instances}
        for handle in instances:
            handle.last_heard = clock.monotonic()
        self.by_data_address = {h.ready.data_address: h for h in instances}
        self.requests: dict[str, RequestRecord] = {}
        self.wire_ids: dict[str, str] = {}  # the id instances know (current attempt) -> request id
        # encode_items: images and video chunks sent to encoders; video_chunks: of them, chunks.
        self.stats = {"encode_items": 0, "encode_cache_hits": 0, "retries": 0, "video_chunks": 0}
        self.max_attempts = MAX_ATTEMPTS
        # Predicts a prompt's prefill from its token count, so that an encoder's deadline leaves
        # room for it (Urgency.later_s); a fitted profile's cost model can replace the default.
        self.prefill_seconds: Callable[[int], float] = default_prefill_seconds
        self.recoveries: dict[str, dict[str, int]] = {}  # dead instance -> recovery -> requests
        self.embeddings_not_sent: dict[str, int] = {}  # request id -> its images' sends given up
        self.instance_stats: dict[str, dict[str, float]] = {}
        self.superseded: Counter[Work] = Counter()  # encodes asked for again before reported done
        self.draining: set[str] = set()  # switching roles (role_switch.py): nothing new placed there
        self.max_model_len = min((h.ready.max_model_len for h in instances if h.has(Role.PREFILL)), default=0)
        self._outputs: dict[str, RequestOutput] = {}  # advanced since the last take_outputs
        self._outbox: list[Outgoing] = []
        self._handlers = {
            NeedEmbeddings: self._need_embeddings,
            EncodeDone: self._encode_done,
            EmbeddingArrived: self._embedding_arrived,
            EmbeddingNotSent: self._embedding_not_sent,
            EmbeddingsEvicted: self._embeddings_evicted,
            SetRolesReply: self._roles_set,
            RequestUpdate: self._update,
            RequestError: self._error,
            EncodeFailed: self._encode_failed,
            InstanceFailed: self._instance_failed,
            InstanceReady: self._instance_ready,
            InstanceStats: self._stats,
        }

    # ---- the interface: each call returns what to send ----------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> list[Outgoing]:
        """Place a new request and send its PrefillTask; ValueError if the id is taken or it is too long."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if len(prompt.prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt.prompt_token_ids)} tokens; the maximum is {self.max_model_len - 1}"
            )
        prefill, decode = self._place(prompt)
        metrics = RequestMetrics(arrival_time=arrival_time or self.clock.now())
        metrics.events.append(LifetimeEvent(Event.ARRIVED, metrics.arrival_time))
        record = RequestRecord(request_id, prompt, params, metrics, prefill.name, decode.name)
        self.requests[request_id] = record
        self.wire_ids[record.wire_id] = request_id
        self._start_attempt(record, prefill, decode)
        return self._take_outbox()

    def _start_attempt(self, record: RequestRecord, prefill: InstanceHandle, decode: InstanceHandle) -> None:
        """Reserve the request's work on `prefill` and `decode`, send its task and its images."""
        record.prefill, record.decode = prefill.name, decode.name
        rid = record.request_id
        self.ledger.reserve(Work(rid, Role.PREFILL), prefill.name, len(record.prompt.prompt_token_ids))
        self.ledger.reserve(Work(rid, Role.DECODE), decode.name, 1)
        to_encode = self._images_to_encode(record, prefill)
        if to_encode and not self._encoders():
            record.error = "no live encoder instance to encode this request's images"
            self._end(record, Trigger.FAIL, "error")  # nothing was sent: no instance to tell
            return
        self._send(prefill.name, _prefill_task(record, prefill, decode, to_encode))
        if to_encode:
            self._dispatch_encodes(record, to_encode)

    def _record_of(self, wire_id: str) -> RequestRecord | None:
        """The live request a message names, if it names its current attempt: what an instance
        sends about an earlier attempt (one that died, or was started over) is ignored."""
        request_id = self.wire_ids.get(wire_id)
        return None if request_id is None else self.requests.get(request_id)

    def abort(self, request_id: str) -> list[Outgoing]:
        """End a request as aborted, telling its instances; a no-op for an unknown or ended one."""
        record = self.requests.get(request_id)
        if record is not None:
            self._abort_on_instances(record)
            self._end(record, Trigger.ABORT, "abort")
        return self._take_outbox()

    def handle(self, message: object) -> list[Outgoing]:
        """Take one message from an instance; messages the router does not act on are ignored, and
        so is everything from an instance marked down (fenced: its work went elsewhere)."""
        sender = self.instances.get(getattr(message, "instance", ""))
        if sender is not None:
            if not sender.alive and not isinstance(message, InstanceReady):
                return []  # a restarted instance says it is back; nothing else is heard from it
            sender.last_heard = self.clock.monotonic()
        handler = self._handlers.get(type(message))
        if handler is not None:
            try:
                handler(message)
            except IllegalTransition as err:
                self._contain(message, err)
        return self._take_outbox()

    def _contain(self, message: object, err: IllegalTransition) -> None:
        """A message that breaks its request's lifecycle is a bug somewhere; it fails that request
        alone, never the router that every other request depends on."""
        logger.error("%s (%s from %s)", err, type(message).__name__, getattr(message, "instance", "?"))
        record = self._record_of(getattr(message, "request_id", ""))
        if record is not None:
            self._fail(record, f"internal error: {err}")

    def tick(self) -> list[Outgoing]:
        """Check every instance still thought alive: one whose launcher says it is gone, or that sent
        nothing for `silence_timeout_s` (hung, stopped), is down; its work is redone or failed."""
        now = self.clock.monotonic()
        for handle in self.instances.values():
            if not handle.alive:
                continue
            if not handle.is_alive():
                self._instance_down(handle.name, "its process died")
            elif self.silence_timeout_s is not None and now - handle.last_heard > self.silence_timeout_s:
                silent = now - handle.last_heard
                self._instance_down(handle.name, f"it sent nothing for {silent:.1f} s")
        return self._take_outbox()

    def on(self, message_type: type, handler: Callable[[Any], None]) -> None:
        """Let another part of the router take messages of this type (role_switch.py)."""
        self._handlers[message_type] = handler

    def take_outputs(self) -> list[RequestOutput]:
        """The outputs (cumulative) of every request that advanced or ended since the last call."""
        outputs, self._outputs = list(self._outputs.values()), {}
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- placing ------------------------------------------------------------------------------

    def _place(self, prompt: ProcessedPrompt) -> tuple[InstanceHandle, InstanceHandle]:
        live = [h.spec for h in self.instances.values() if h.alive and h.name not in self.draining]
        prefills = live
        if prompt.images and not self._encoders():
            # No encoder instance is left: an instance that prefills with the vision tower at hand
            # (EP, EPD) encodes the images itself, where the layout has one.
            prefills = self._prefills_with_vision() or live
        request = RequestToPlace(len(prompt.prompt_token_ids), self.prefill_seconds)
        prefill = self.placement.prefill.choose(prefills, self.ledger, {}, request)
        decode = self.placement.decode.choose(live, self.ledger, {Role.PREFILL: prefill})
        return self.instances[prefill.name], self.instances[decode.name]

    def _images_to_encode(self, record: RequestRecord, prefill: InstanceHandle) -> list[int]:
        """The images (first index of each content) that P neither holds nor is about to get."""
        if prefill.has(Role.ENCODE):
            return []  # it encodes them itself, from the pixels in its task
        wanted, seen = [], set()
        for index, image in enumerate(record.prompt.images):
            if image.content_hash not in seen and not self.held.holds(prefill.name, image.content_hash):
                wanted.append(index)
            seen.add(image.content_hash)
        return wanted

    def _encoders(self) -> list[InstanceSpec]:
        # An instance that also prefills encodes only its own requests' images (in-process); one
        # that drains (a role switch) takes no new image.
        live = [h for h in self.instances.values() if h.alive and h.name not in self.draining]
        return [h.spec for h in live if h.has(Role.ENCODE) and not h.has(Role.PREFILL)]

    def _prefills_with_vision(self) -> list[InstanceSpec]:
        live = [h for h in self.instances.values() if h.alive and h.name not in self.draining]
        return [h.spec for h in live if h.has(Role.ENCODE) and h.has(Role.PREFILL)]

    def _need_embeddings(self, msg: NeedEmbeddings) -> None:
        """P lacks images the router thought it held (evicted meanwhile, or lost with a dead
        encoder): send them now."""
        record = self._record_of(msg.request_id)
        if record is None:
            return
        if not self._encoders():
            if self._prefills_with_vision():
                self._start_over(
                    record, "no live encoder instance: the images go to one with the vision tower"
                )
            else:
                self._fail(record, "no live encoder instance to encode this request's images")
            return
        self._dispatch_encodes(record, msg.items)

    def _dispatch_encodes(self, record: RequestRecord, items: list[int]) -> None:
        """Send the images at `items` to the encoders: each a unit, or a video in chunks of its
        temporal groups over several encoders (encode_units.py). P counts a video's chunks as one
        transfer of it (it joins them), and so does the router's view of what P will hold."""
        record.advance(Trigger.NEED_IMAGES)
        images = record.prompt.images
        encoders = self._encoders()
        units = {u.work_item: u for u in encode_units(images, items, self.placement.video.parts(encoders))}
        wanted = [ImageToEncode(w, u.key, u.num_patches) for w, u in units.items()]
        assignment = self.placement.encode.assign(wanted, encoders, self.ledger, self.affinity)
        tasks: dict[str, list[EncodeItem]] = {}
        for item, encoder in assignment.items():
            unit = units[item]
            work = Work(record.request_id, Role.ENCODE, item)
            if self.ledger.holder(work) is not None:
                # Asked for again before the last encode of it was reported done (P had no room
                # for what arrived): this one supersedes it, and its report will be no news.
                self.ledger.release(work)
                self.superseded[work] += 1
            self.ledger.reserve(work, encoder, unit.num_patches)
            self.affinity.started(unit.key, encoder)
            self.held.dispatched(record.prefill, images[unit.index].content_hash, encoder)
            tasks.setdefault(encoder, []).append(unit.item)
            event = LifetimeEvent.now(self.clock, Event.ENCODE_QUEUED, encoder, unit.index)
            record.metrics.events.append(event)
        dest = self.instances[record.prefill].ready.data_address
        urgency = _urgency(record, self.prefill_seconds(len(record.prompt.prompt_token_ids)))
        for name, encode_items in tasks.items():
            self._send(name, EncodeTask(record.wire_id, encode_items, dest, urgency))
        self.stats["encode_items"] += len(units)
        self.stats["video_chunks"] += sum(u.key != images[u.index].content_hash for u in units.values())

    # ---- progress -----------------------------------------------------------------------------

    def _encode_done(self, msg: EncodeDone) -> None:
        record = self._record_of(msg.request_id)
        self.stats["encode_cache_hits"] += len(msg.cache_hits)
        if record is None:
            return
        record.metrics.events.extend(msg.events)
        keys = _unit_keys(record, msg.items, msg.keys)
        works = [Work(record.request_id, Role.ENCODE, work_item(i, k)) for i, k in zip(msg.items, keys)]
        if all(self.ledger.holder(w) is None and self.superseded[w] > 0 for w in works):
            for w in works:  # the late report of encodes asked for again since: no news
                self._decrement_superseded(w)
            return
        for work, key in zip(works, keys):
            self.ledger.release(work)
            self.affinity.finished(key, msg.instance)
        images_out = self._encodes_out(record.request_id)
        record.advance(Trigger.IMAGE_ENCODED if images_out else Trigger.LAST_IMAGE_ENCODED)

    def _encodes_out(self, request_id: str) -> bool:
        """Whether an image (or video chunk) of the request is still reserved on an encoder."""
        holders = self.ledger.instances_of(request_id)
        return any(w.stage is Role.ENCODE for name in holders for w in self.ledger.works_on(request_id, name))

    def _encode_failed(self, msg: EncodeFailed) -> None:
        """An encoder found images it cannot decode. The request fails (a 400: its input is bad);
        then its P hears that those transfers will not come, so that another request there
        waiting for the same image asks again (and fails the same way) instead of waiting."""
        record = self._record_of(msg.request_id)
        if record is None:
            return
        hashes = sorted({record.prompt.images[index].content_hash for index in msg.items})
        keys = _unit_keys(record, msg.items, msg.keys)
        for index, key in zip(msg.items, keys):
            self.ledger.release(Work(record.request_id, Role.ENCODE, work_item(index, key)))
            self.affinity.failed(key)
        for content_hash in hashes:
            self.held.not_coming(record.prefill, content_hash, msg.instance)
        record.invalid_input = True
        self._fail(record, msg.error)  # first: P drops the request before it hears of the loss
        self._send(record.prefill, EmbeddingsLost(hashes))

    def _decrement_superseded(self, work: Work) -> None:
        self.superseded[work] -= 1
        if self.superseded[work] <= 0:
            del self.superseded[work]

    def _embedding_arrived(self, msg: EmbeddingArrived) -> None:
        # A video chunk's arrival is one of the video's transfers (the view counts it so); the
        # encoder releases the chunk's own entry.
        source = self.by_data_address.get(msg.source)
        encoder = source.name if source is not None else None
        self.held.arrived(msg.instance, item_key(msg.content_hash), encoder)
        if source is not None:
            dest = self.instances[msg.instance].ready.data_address
            self._send(source.name, ReleaseEmbedding(msg.content_hash, dest))
        for request_id, event in msg.events:
            record = self._record_of(request_id)
            if record is not None:
                record.metrics.events.append(event)

    def _embedding_not_sent(self, msg: EmbeddingNotSent) -> None:
        """An encoder gave up sending an image to a P (its retries failed): P hears that it will not
        come and its requests waiting for it ask again (`NeedEmbeddings`), as after an encoder's
        death. Each request whose prefill P holds counts the loss; at `max_attempts` it fails."""
        prefill = self.by_data_address.get(msg.dest)
        if prefill is None or not prefill.alive or prefill.ready.data_address != msg.dest:
            return  # P died since (its death told the encoders: DestinationGone)
        content_hash = item_key(msg.content_hash)  # a video's, for one of its chunks
        self.held.not_coming(prefill.name, content_hash, msg.instance)
        for record in list(self.requests.values()):
            hashes = {image.content_hash for image in record.prompt.images}
            if content_hash not in hashes:
                continue
            if self.ledger.holder(Work(record.request_id, Role.PREFILL)) != prefill.name:
                continue
            lost = self.embeddings_not_sent.get(record.request_id, 0) + 1
            self.embeddings_not_sent[record.request_id] = lost
            if lost >= self.max_attempts:
                error = f"{msg.instance}: embeddings not sent to {prefill.name} {lost} times: {msg.error}"
                self._fail(record, error)  # first: P drops the request before it hears of the loss
        self._send(prefill.name, EmbeddingsLost([content_hash]))

    def _update(self, msg: RequestUpdate) -> None:
        record = self._record_of(msg.request_id)
        if record is None:
            return
        if msg.first_index != len(record.token_ids):
            record.early.append(msg)  # D overtook P: apply once the tokens before it are in
            return
        self._apply_update(record, msg)
        for early in sorted(record.early, key=lambda m: m.first_index):
            if early.first_index == len(record.token_ids) and record.request_id in self.requests:
                record.early.remove(early)
                self._apply_update(record, early)

    def _apply_update(self, record: RequestRecord, msg: RequestUpdate) -> None:
        record.metrics.events.extend(msg.events)
        if not record.token_ids and msg.new_token_ids:
            record.metrics.first_token_time = self.clock.now()
            record.num_cached_tokens = msg.num_cached_tokens
        record.token_ids.extend(msg.new_token_ids)
        if msg.new_logprobs:
            record.logprobs.extend(msg.new_logprobs)
        if record.token_ids and not record.has_first_token:
            record.advance(Trigger.FIRST_TOKEN)
        elif record.has_first_token:
            record.advance(Trigger.TOKENS)
        if msg.instance == record.decode:
            # D produces tokens, so it has the KV: P's part is done. (Until then P's death could
            # leave D waiting for a hand-off that never comes: recovery.py redoes the request.)
            self.ledger.release(Work(record.request_id, Role.PREFILL))
            self.ledger.release(Work(record.request_id, Role.DECODE, MIGRATION_SOURCE))
        if msg.finish_reason is not None:
            record.text, record.stop_reason = msg.text or "", msg.stop_reason
            self._end(record, Trigger.FINISH, msg.finish_reason)
        else:
            self._outputs[record.request_id] = record.output()

    def _embeddings_evicted(self, msg: EmbeddingsEvicted) -> None:
        self.held.evicted(msg.instance, msg.content_hashes)

    def _stats(self, msg: InstanceStats) -> None:
        self.instance_stats[msg.instance] = msg.stats

    def _roles_set(self, msg: SetRolesReply) -> None:
        handle = self.instances.get(msg.instance)
        if handle is None:
            return
        if msg.error is not None:
            logger.warning("%s kept its roles %s: %s", msg.instance, msg.roles, msg.error)
        handle.spec = handle.spec.with_roles(frozenset(Role(letter) for letter in msg.roles))
        if not handle.has(Role.PREFILL) or handle.has(Role.ENCODE):
            self.held.forget(handle.name)  # no MM cache of embeddings from encoders there now

    # ---- failures and ends --------------------------------------------------------------------

    def _error(self, msg: RequestError) -> None:
        record = self._record_of(msg.request_id)
        if record is not None and transfer_gave_up(msg.error):
            self._transfer_failed(record, f"{msg.instance}: {msg.error}")
        elif record is not None:
            record.invalid_input, record.retry_after = msg.invalid_input, msg.retry_after
            self._fail(record, msg.error if msg.invalid_input else f"{msg.instance}: {msg.error}")

    def _instance_ready(self, msg: InstanceReady) -> None:
        """An instance that was down is back (restarted): its first roles, new addresses, empty
        caches. A ready report from an instance thought alive changes nothing."""
        handle = self.instances.get(msg.instance)
        if handle is None or handle.alive:
            return
        handle.ready, handle.spec, handle.alive = msg, handle.started_as, True
        handle.last_heard = self.clock.monotonic()
        self.by_data_address[msg.data_address] = handle
        self.held.forget(handle.name)
        logger.info("%s is back (pid %d)", handle.name, msg.pid)

    def _instance_failed(self, msg: InstanceFailed) -> None:
        self._instance_down(msg.instance, msg.error.strip().splitlines()[-1])

    def _instance_down(self, name: str, reason: str) -> None:
        """What the dead instance held is redone elsewhere where the request allows (table in
        `recovery.py`); the rest fails with the reason."""
        self.instances[name].alive = False
        self.affinity.encoder_died(name)
        self.held.forget(name)
        for record in list(self.requests.values()):
            held = self.ledger.works_on(record.request_id, name)
            if not held:
                continue
            try:
                self._recover(record, held, name, f"instance {name} failed ({reason})")
            except IllegalTransition as err:
                # Reached from tick(), outside handle()'s guard: a bug in one request's recovery
                # must fail that request, not the router (it raised out of Cluster.step before).
                logger.error("%s (recovering from the death of %s)", err, name)
                self._fail(record, f"internal error: {err}")
        # P's requests still waiting for what the encoder was sending ask again (NeedEmbeddings).
        for prefill, hashes in self.held.encoder_died(name).items():
            self._send(prefill, EmbeddingsLost(hashes))
        # Encoders hold a pin per copy they sent until its receipt, which a dead P never sends.
        dead = self.instances[name]
        if dead.has(Role.PREFILL) and not dead.has(Role.ENCODE):
            for encoder in self.instances.values():  # draining ones too: they hold pins as well
                if encoder.alive and encoder.has(Role.ENCODE) and not encoder.has(Role.PREFILL):
                    self._send(encoder.name, DestinationGone(dead.ready.data_address))

    def _recover(self, record: RequestRecord, held: list[Work], dead: str, error: str) -> None:
        action = recovery_for(record, held, self.max_attempts)
        counts = self.recoveries.setdefault(dead, {})
        counts[action.value] = counts.get(action.value, 0) + 1
        if action is Recovery.RELEASE_IMAGES:
            for work in held:
                self.ledger.release(work)  # P asks for them again, on EmbeddingsLost
        elif action in (Recovery.START_OVER, Recovery.CONTINUE):
            self._start_over(record, error)
        else:
            self._fail(record, error)

    def _transfer_failed(self, record: RequestRecord, error: str) -> None:
        """A transfer between two live instances failed after its retries: the pair is taken
        for broken, and the request placed anew (recovery.py, second table)."""
        if recovery_after_transfer(record, self.max_attempts) is Recovery.FAIL:
            self._fail(record, error)
        else:
            self._start_over(record, error)

    def _start_over(self, record: RequestRecord, error: str) -> None:
        """A new attempt on live instances: from the start, or (it has tokens) from its prompt and
        tokens prefilled again, its next token sampled after them."""
        try:
            prefill, decode = self._place(record.prompt)
        except RuntimeError as err:
            self._fail(record, f"{error}; no instance left to retry on ({err})")
            return
        self._abort_on_instances(record)  # a live D or P of the old attempt drops what it holds
        self.ledger.release_request(record.request_id)
        del self.wire_ids[record.wire_id]
        record.new_attempt(self._free_wire_id(record))
        self.wire_ids[record.wire_id] = record.request_id
        self.stats["retries"] += 1
        logger.warning("request %s: %s; attempt %d", record.request_id, error, record.attempt)
        self._start_attempt(record, prefill, decode)

    def _free_wire_id(self, record: RequestRecord) -> str:
        """`<id>~<attempt>`, lengthened in the unlikely case that a caller's id is already that."""
        wire_id = f"{record.request_id}~{record.attempt + 1}"
        while wire_id in self.wire_ids or wire_id in self.requests:
            wire_id += "~"
        return wire_id

    def _fail(self, record: RequestRecord, error: str) -> None:
        record.error = error
        self._abort_on_instances(record)
        self._end(record, Trigger.FAIL, "error")

    def _abort_on_instances(self, record: RequestRecord) -> None:
        for name in sorted({record.prefill, record.decode}):
            self._send(name, AbortRequest(record.wire_id))

    def _end(self, record: RequestRecord, trigger: Trigger, finish_reason: str) -> None:
        record.advance(trigger)
        record.finish_reason = finish_reason
        record.metrics.finished_time = self.clock.now()
        self.ledger.release_request(record.request_id)
        self.embeddings_not_sent.pop(record.request_id, None)
        for work in [w for w in self.superseded if w.request_id == record.request_id]:
            del self.superseded[work]
        del self.requests[record.request_id]
        del self.wire_ids[record.wire_id]
        self._outputs[record.request_id] = record.output()

    # ---- outgoing -----------------------------------------------------------------------------

    def _send(self, instance: str, message: ToInstance) -> None:
        # A dead instance reads nothing: what it held is failed or released already.
        if self.instances[instance].alive:
            self._outbox.append(Outgoing(instance, message))

    def _take_outbox(self) -> list[Outgoing]:
        outgoing, self._outbox = self._outbox, []
        return outgoing


def _prefill_task(
    record: RequestRecord, prefill: InstanceHandle, decode: InstanceHandle, encoding: list[int]
) -> PrefillTask:
    prompt = record.prompt
    # An instance that encodes in-process (EP) gets the pixels with the task.
    pixels = None
    if prefill.has(Role.ENCODE):
        pixels = [encode_item(i, img) for i, img in enumerate(prompt.images)]
    return PrefillTask(
        record.wire_id,
        prompt.prompt_token_ids,
        [(p.offset, p.length) for p in prompt.placeholders],
        [img.content_hash for img in prompt.images],
        [img.grid_thw for img in prompt.images],
        record.params,
        record.metrics.arrival_time,
        None if decode is prefill else decode.ready.data_address,
        prompt.prompt,
        pixels,
        encoding,
        list(record.token_ids),  # empty unless it continues after a dead decode instance
        [img.time_interval for img in prompt.images],
    )


def _urgency(record: RequestRecord, later_s: float) -> Urgency:
    """What an encoder's queue policy orders the request's images by: its TTFT deadline less the
    prefill still to come after the encode (`later_s`)."""
    params = record.params
    return Urgency(record.metrics.arrival_time, params.slo_ttft, params.priority, later_s)


def default_prefill_seconds(prompt_tokens: int) -> float:
    """The prefill a prompt will need, at the queue policies' default price per token."""
    return prompt_tokens * DEFAULT_TOKEN_S


def _unit_keys(record: RequestRecord, items: list[int], keys: list[str]) -> list[str]:
    """The key of each encoded item an encoder reports: as it names them (a video chunk's), or,
    from an encoder that names none, the images' own."""
    return keys or [record.prompt.images[index].content_hash for index in items]

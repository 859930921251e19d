"""The router: owns every request's lifecycle across instances, in the front process.

    add_request --PrefillTask--> P ...NeedEmbeddings--> router --EncodeTask(s)--> E(s)
    E --embeddings (connector)--> P --EmbeddingArrived--> router --ReleaseEmbedding--> E
    P --first token (RequestUpdate)--> router;  P --KV (connector)--> D --tokens--> router

What it leaves to others, and what it keeps:
- Where work goes: `placement.py` (the policies and a table of which decides what: least-loaded P,
  D kept on a P that decodes, IRP spread of images over encoders with cache affinity). Every part
  of a request is sent to the one P instance chosen for it, which joins them.
- What each instance holds: `ledger.py`, one reservation per piece of work (a request's prompt
  tokens on P, its slot on D, each image's patches on E), reserved when sent, released when done;
  a request that ends releases whatever it still holds. Loads, and so placement, read the ledger.
- A dead instance fails the requests holding work on it, with the reason; the rest carry on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from epd.clock import WALL_CLOCK, Clock
from epd.cluster.layout import InstanceSpec, Role
from epd.cluster.ledger import LoadLedger, Work
from epd.cluster.messages import (
    AbortRequest,
    EmbeddingArrived,
    EncodeDone,
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
    decode_for_router,
    encode,
)
from epd.cluster.placement import EncodeAffinity, ImageToEncode, Placement
from epd.inputs.types import ImageInput, ProcessedPrompt
from epd.lifetime import Event, LifetimeEvent
from epd.outputs import CompletionOutput, PositionLogprobs, RequestMetrics, RequestOutput
from epd.sampling_params import SamplingParams


@dataclass
class InstanceHandle:
    spec: InstanceSpec
    socket: zmq.Socket  # PUSH to the instance's control inbox
    ready: InstanceReady
    is_alive: Callable[[], bool]
    alive: bool = True

    @property
    def name(self) -> str:
        return self.spec.name

    def has(self, role: Role) -> bool:
        return role in self.spec.roles

    def send(self, message: object) -> None:
        self.socket.send(encode(message))


@dataclass
class _RequestState:
    request_id: str
    prompt: ProcessedPrompt
    params: SamplingParams
    metrics: RequestMetrics
    prefill: str
    decode: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    prefill_done: bool = False
    early: list[RequestUpdate] = field(default_factory=list)  # updates that arrived out of order

    def output(self) -> RequestOutput:
        completion = CompletionOutput(
            0,
            self.text,
            list(self.token_ids),
            list(self.logprobs) if self.params.logprobs is not None else None,
            self.finish_reason,
            self.stop_reason,
        )
        return RequestOutput(
            self.request_id,
            self.prompt.prompt,
            self.prompt.prompt_token_ids,
            [completion],
            self.finish_reason is not None,
            self.metrics,
            self.num_cached_tokens,
            self.error,
        )


class Router:
    def __init__(
        self,
        instances: list[InstanceHandle],
        inbox: zmq.Socket,
        clock: Clock = WALL_CLOCK,
        placement: Placement | None = None,
    ) -> None:
        self.clock = clock
        self.placement = placement or Placement()
        self.ledger = LoadLedger()
        self.affinity = EncodeAffinity()
        self.instances = {h.name: h for h in instances}
        self.by_data_address = {h.ready.data_address: h for h in instances}
        self.inbox = inbox
        self.requests: dict[str, _RequestState] = {}
        self.stats = {"encode_items": 0, "encode_cache_hits": 0}
        self._outputs: dict[str, RequestOutput] = {}  # advanced since the last poll
        self.instance_stats: dict[str, dict[str, float]] = {}
        self.max_model_len = min((h.ready.max_model_len for h in instances if h.has(Role.PREFILL)), default=0)

    # ---- requests in ----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if len(prompt.prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt.prompt_token_ids)} tokens; the maximum is {self.max_model_len - 1}"
            )
        prefill, decode = self._place(request_id)
        metrics = RequestMetrics(arrival_time=arrival_time or self.clock.now())
        metrics.events.append(LifetimeEvent(Event.ARRIVED, metrics.arrival_time))
        state = _RequestState(request_id, prompt, params, metrics, prefill.name, decode.name)
        self.requests[request_id] = state
        self.ledger.reserve(Work(request_id, Role.PREFILL), prefill.name, len(prompt.prompt_token_ids))
        self.ledger.reserve(Work(request_id, Role.DECODE), decode.name, 1)
        placeholders = [(p.offset, p.length) for p in prompt.placeholders]
        # An instance that encodes in-process (EP) gets the pixels with the task.
        pixels = None
        if prefill.has(Role.ENCODE):
            pixels = [_encode_item(i, img) for i, img in enumerate(prompt.images)]
        prefill.send(
            PrefillTask(
                request_id,
                prompt.prompt_token_ids,
                placeholders,
                [img.content_hash for img in prompt.images],
                [img.grid_thw for img in prompt.images],
                params,
                metrics.arrival_time,
                None if decode is prefill else decode.ready.data_address,
                prompt.prompt,
                pixels,
            )
        )

    def abort(self, request_id: str) -> None:
        state = self.requests.get(request_id)
        if state is None:
            return
        for name in {state.prefill, state.decode}:
            if self.instances[name].alive:
                self.instances[name].send(AbortRequest(request_id))
        self._finish(state, "abort")

    def _place(self, request_id: str) -> tuple[InstanceHandle, InstanceHandle]:
        live = [h.spec for h in self.instances.values() if h.alive]
        prefill = self.placement.prefill.choose(live, self.ledger, {})
        decode = self.placement.decode.choose(live, self.ledger, {Role.PREFILL: prefill})
        return self.instances[prefill.name], self.instances[decode.name]

    # ---- messages in ----------------------------------------------------------------------------

    def poll(self, timeout_ms: int = 100) -> list[RequestOutput]:
        """Handle what arrived (waiting up to timeout_ms for the first message); the outputs
        (cumulative, as in RequestOutput) of every request that advanced or finished."""
        if self.inbox.poll(timeout_ms):
            while True:
                try:
                    data = self.inbox.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._handle(decode_for_router(data))
        self._check_instances()
        outputs, self._outputs = list(self._outputs.values()), {}
        return outputs

    def _handle(self, msg: object) -> None:
        handlers = {
            NeedEmbeddings: self._dispatch_encodes,
            EncodeDone: self._encode_done,
            EmbeddingArrived: self._embedding_arrived,
            RequestUpdate: self._update,
            RequestError: self._error,
            InstanceFailed: self._instance_failed,
            InstanceStats: self._stats,
        }
        handler = handlers.get(type(msg))
        if handler is not None:
            handler(msg)

    def _dispatch_encodes(self, msg: NeedEmbeddings) -> None:
        state = self.requests.get(msg.request_id)
        if state is None:
            return
        # An instance that also prefills encodes only its own requests' images (in-process).
        live = [h for h in self.instances.values() if h.alive]
        encoders = [h.spec for h in live if h.has(Role.ENCODE) and not h.has(Role.PREFILL)]
        if not encoders:
            self._fail(state, "no live encoder instance to encode this request's images")
            return
        images = state.prompt.images
        wanted = [ImageToEncode(i, images[i].content_hash, images[i].num_patches) for i in msg.items]
        assignment = self.placement.encode.assign(wanted, encoders, self.ledger, self.affinity)
        tasks: dict[str, list[EncodeItem]] = {}
        for index, encoder in assignment.items():
            image = images[index]
            self.ledger.reserve(Work(state.request_id, Role.ENCODE, index), encoder, image.num_patches)
            self.affinity.started(image.content_hash, encoder)
            tasks.setdefault(encoder, []).append(_encode_item(index, image))
            state.metrics.events.append(LifetimeEvent.now(self.clock, Event.ENCODE_QUEUED, encoder, index))
        dest = self.instances[state.prefill].ready.data_address
        for name, items in tasks.items():
            self.instances[name].send(EncodeTask(state.request_id, items, dest))
        self.stats["encode_items"] += len(msg.items)

    def _encode_done(self, msg: EncodeDone) -> None:
        state = self.requests.get(msg.request_id)
        self.stats["encode_cache_hits"] += len(msg.cache_hits)
        if state is None:
            return
        state.metrics.events.extend(msg.events)
        for index in msg.items:
            self.ledger.release(Work(state.request_id, Role.ENCODE, index))
            self.affinity.finished(state.prompt.images[index].content_hash, msg.instance)

    def _embedding_arrived(self, msg: EmbeddingArrived) -> None:
        source = self.by_data_address.get(msg.source)
        if source is not None and source.alive:
            source.send(ReleaseEmbedding(msg.content_hash))
        for request_id, event in msg.events:
            state = self.requests.get(request_id)
            if state is not None:
                state.metrics.events.append(event)

    def _update(self, msg: RequestUpdate) -> None:
        state = self.requests.get(msg.request_id)
        if state is None:
            return
        if msg.first_index != len(state.token_ids):
            state.early.append(msg)  # D overtook P: apply once the tokens before it are in
            return
        self._apply_update(state, msg)
        for early in sorted(state.early, key=lambda m: m.first_index):
            if early.first_index == len(state.token_ids) and state.request_id in self.requests:
                state.early.remove(early)
                self._apply_update(state, early)

    def _apply_update(self, state: _RequestState, msg: RequestUpdate) -> None:
        state.metrics.events.extend(msg.events)
        if not state.token_ids and msg.new_token_ids:
            state.metrics.first_token_time = self.clock.now()
            state.num_cached_tokens = msg.num_cached_tokens
        state.token_ids.extend(msg.new_token_ids)
        if msg.new_logprobs:
            state.logprobs.extend(msg.new_logprobs)
        if state.token_ids and not state.prefill_done:
            state.prefill_done = True
            self.ledger.release(Work(state.request_id, Role.PREFILL))
        if msg.finish_reason is not None:
            state.text, state.stop_reason = msg.text or "", msg.stop_reason
            self._finish(state, msg.finish_reason)
        else:
            self._outputs[state.request_id] = state.output()

    def _stats(self, msg: InstanceStats) -> None:
        self.instance_stats[msg.instance] = msg.stats

    def _error(self, msg: RequestError) -> None:
        state = self.requests.get(msg.request_id)
        if state is not None:
            self._fail(state, f"{msg.instance}: {msg.error}")

    # ---- failures -------------------------------------------------------------------------------

    def _check_instances(self) -> None:
        for handle in self.instances.values():
            if handle.alive and not handle.is_alive():
                self._instance_down(handle.name, "its process died")

    def _instance_failed(self, msg: InstanceFailed) -> None:
        self._instance_down(msg.instance, msg.error.strip().splitlines()[-1])

    def _instance_down(self, name: str, reason: str) -> None:
        self.instances[name].alive = False
        for state in list(self.requests.values()):
            # Its decode slot until the end, prefill until the first token, each image until encoded.
            if name in self.ledger.instances_of(state.request_id):
                self._fail(state, f"instance {name} failed ({reason})")
        self.affinity.encoder_died(name)

    def _fail(self, state: _RequestState, error: str) -> None:
        state.error = error
        for name in {state.prefill, state.decode}:
            if self.instances[name].alive:
                self.instances[name].send(AbortRequest(state.request_id))
        self._finish(state, "error")

    def _finish(self, state: _RequestState, reason: str) -> None:
        state.finish_reason = reason
        state.metrics.finished_time = self.clock.now()
        self.ledger.release_request(state.request_id)
        del self.requests[state.request_id]
        self._outputs[state.request_id] = state.output()

    def has_unfinished(self) -> bool:
        return bool(self.requests)


def _encode_item(index: int, image: ImageInput) -> EncodeItem:
    # uint8, one frame: 8x fewer bytes through the control plane than the tower's float32 input.
    if image.raw_patches is None:
        raise ValueError("images sent to another instance need their raw_patches (process_image keeps them)")
    raw = image.raw_patches.contiguous()
    return EncodeItem(index, image.content_hash, image.grid_thw, raw.numpy().tobytes(), raw.shape[1])

"""The router: owns every request's lifecycle across instances, in the front process.

    add_request --PrefillTask--> P ...NeedEmbeddings--> router --EncodeTask(s)--> E(s)
    E --embeddings (connector)--> P --EmbeddingArrived--> router --ReleaseEmbedding--> E
    P --first token (RequestUpdate)--> router;  P --KV (connector)--> D --tokens--> router

Choices it makes:
- P and D by load (outstanding prompt tokens for P, running requests for D), not turn;
  a P instance that also decodes keeps its requests.
- Images across encoder instances (intra-request parallelism): an image already being
  encoded, or encoded before, goes where that happened (cache hit, one encoding);
  the rest are spread largest first onto the encoder with the fewest queued patches.
  Every part of a request is sent to the one P instance chosen for it, which joins them.
- A dead instance fails the requests it held, with the reason; the rest carry on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from epd.clock import WALL_CLOCK, Clock
from epd.cluster.layout import InstanceSpec, Role
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
    load: int = 0  # outstanding work in the unit of its stage (tokens, requests or patches)

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
    encoders: dict[int, str] = field(default_factory=dict)  # image index -> encoder with it queued
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
    def __init__(self, instances: list[InstanceHandle], inbox: zmq.Socket, clock: Clock = WALL_CLOCK) -> None:
        self.clock = clock
        self.instances = {h.name: h for h in instances}
        self.by_data_address = {h.ready.data_address: h for h in instances}
        self.inbox = inbox
        self.requests: dict[str, _RequestState] = {}
        self.inflight: dict[str, str] = {}  # content hash -> encoder encoding it now
        self.encoded_at: dict[str, str] = {}  # content hash -> encoder that last encoded it
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
        prefill = self._least_loaded(Role.PREFILL)
        decode = prefill if prefill.has(Role.DECODE) else self._least_loaded(Role.DECODE)
        metrics = RequestMetrics(arrival_time=arrival_time or self.clock.now())
        metrics.events.append(LifetimeEvent(Event.ARRIVED, metrics.arrival_time))
        state = _RequestState(request_id, prompt, params, metrics, prefill.name, decode.name)
        self.requests[request_id] = state
        prefill.load += len(prompt.prompt_token_ids)
        decode.load += 1
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

    def _least_loaded(self, role: Role) -> InstanceHandle:
        candidates = [h for h in self.instances.values() if h.alive and h.has(role)]
        if not candidates:
            raise RuntimeError(f"no live instance can take role {role.value}")
        return min(candidates, key=lambda h: h.load)

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
        encoders = [
            h for h in self.instances.values() if h.alive and h.has(Role.ENCODE) and not h.has(Role.PREFILL)
        ]
        if not encoders:
            self._fail(state, "no live encoder instance to encode this request's images")
            return
        tasks: dict[str, list[EncodeItem]] = {}
        for index in sorted(msg.items, key=lambda i: -state.prompt.images[i].num_patches):
            image = state.prompt.images[index]
            encoder = self._pick_encoder(image, encoders)
            encoder.load += image.num_patches
            self.inflight[image.content_hash] = encoder.name
            state.encoders[index] = encoder.name
            tasks.setdefault(encoder.name, []).append(_encode_item(index, image))
            state.metrics.events.append(
                LifetimeEvent.now(self.clock, Event.ENCODE_QUEUED, encoder.name, index)
            )
        dest = self.instances[state.prefill].ready.data_address
        for name, items in tasks.items():
            self.instances[name].send(EncodeTask(state.request_id, items, dest))
        self.stats["encode_items"] += len(msg.items)

    def _pick_encoder(self, image: ImageInput, encoders: list[InstanceHandle]) -> InstanceHandle:
        for known in (self.inflight.get(image.content_hash), self.encoded_at.get(image.content_hash)):
            if known is not None and self.instances[known].alive:
                return self.instances[known]
        return min(encoders, key=lambda h: h.load)

    def _encode_done(self, msg: EncodeDone) -> None:
        state = self.requests.get(msg.request_id)
        self.stats["encode_cache_hits"] += len(msg.cache_hits)
        if state is None:
            return
        state.metrics.events.extend(msg.events)
        encoder = self.instances[msg.instance]
        for index in msg.items:
            image = state.prompt.images[index]
            encoder.load -= image.num_patches
            state.encoders.pop(index, None)
            self.inflight.pop(image.content_hash, None)
            self.encoded_at[image.content_hash] = msg.instance

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
            self.instances[state.prefill].load -= len(state.prompt.prompt_token_ids)
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
            involved = {state.decode, *state.encoders.values()}
            if not state.prefill_done:
                involved.add(state.prefill)
            if name in involved:
                self._fail(state, f"instance {name} failed ({reason})")
        for h, encoder in list(self.inflight.items()):
            if encoder == name:
                del self.inflight[h]

    def _fail(self, state: _RequestState, error: str) -> None:
        state.error = error
        for name in {state.prefill, state.decode}:
            if self.instances[name].alive:
                self.instances[name].send(AbortRequest(state.request_id))
        self._finish(state, "error")

    def _finish(self, state: _RequestState, reason: str) -> None:
        state.finish_reason = reason
        state.metrics.finished_time = self.clock.now()
        if not state.prefill_done:
            self.instances[state.prefill].load -= len(state.prompt.prompt_token_ids)
            state.prefill_done = True
        self.instances[state.decode].load -= 1
        for index, encoder in state.encoders.items():
            self.instances[encoder].load -= state.prompt.images[index].num_patches
        state.encoders.clear()
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

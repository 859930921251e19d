"""One instance process: `receive -> schedule -> run -> postprocess/send`, whatever its roles.

Roles decide which parts exist, not how the loop runs:

| roles            | encoder worker | engine (LLM)                       | connector            |
|------------------|----------------|------------------------------------|----------------------|
| E                | yes            | -                                  | sends embeddings     |
| P, PD            | -              | embeddings from the MM cache       | receives embeddings  |
| EP, EPD          | -              | encodes in-process                 | (local: no transfers)|
| P, EP (no D)     |                | hands KV off after the first token | sends KV             |
| D                | -              | KV arrives with the request        | receives KV          |

With `kv_streaming="layer"`, P sends each layer's KV while prefill runs and D assembles it
when the hand-off arrives (message order: epd.cluster.kv_handoff). D drops the KV of a request
aborted before its KV arrived (`AbortedBeforeKV`).

The loop blocks on a poller over the control socket and the connector, so an idle
instance uses no CPU; it exits when told to, or when its parent process is gone.
"""

from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass, field

import msgspec
import torch
import zmq

from epd.clock import WALL_CLOCK, Clock
from epd.cluster.encoder_worker import EncoderWorker, PixelDecoder
from epd.cluster.kv_handoff import (
    KV_KEY,
    LAYER_KEY,
    AbortedBeforeKV,
    KVSender,
    LayerParts,
    request_of_key,
)
from epd.cluster.layout import InstanceSpec, Role
from epd.cluster.messages import (
    AbortRequest,
    EmbeddingArrived,
    EncodeTask,
    InstanceFailed,
    InstanceReady,
    InstanceStats,
    NeedEmbeddings,
    PrefillTask,
    ReleaseEmbedding,
    RequestError,
    RequestUpdate,
    Shutdown,
    decode_for_instance,
    encode,
)
from epd.cluster.stats import mm_cache_stats
from epd.config import EngineConfig
from epd.engine.llm_engine import LLMEngine
from epd.engine.mm_cache import MMCache
from epd.engine.request import Request
from epd.inputs.image_processor import ImageProcessorConfig
from epd.inputs.tokenizer import Tokenizer
from epd.inputs.types import ImageInput, PlaceholderRange, ProcessedPrompt
from epd.lifetime import Event, LifetimeEvent
from epd.models.loader import build_model
from epd.models.qwen2_vl import VISION
from epd.outputs import PositionLogprobs
from epd.sampling_params import SamplingParams
from epd.transfer.base import Connector, Received
from epd.transfer.base import create_connector as make_connector

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 200  # only bounds how fast a lost parent is noticed; work wakes the poller
STATS_INTERVAL_S = 0.25


@dataclass(frozen=True)
class InstanceConfig:
    spec: InstanceSpec
    engine: EngineConfig
    router_address: str
    transfer: str = "shm"
    host: str = "127.0.0.1"
    mm_cache_bytes: int = 256 << 20
    mm_block_size: int = 16
    max_encode_batch_patches: int = 49152  # four 1344 px images (9216 patches each) in one batch
    num_threads: int = 1
    kv_streaming: str = "request"  # "layer": P sends each layer's KV as prefill writes it (see cluster)
    parent_pid: int = field(default_factory=os.getpid)

    @property
    def name(self) -> str:
        return self.spec.name

    def has(self, role: Role) -> bool:
        return role in self.spec.roles


def instance_main(cfg: InstanceConfig) -> None:
    """Process entry point: build, report ready, serve until shutdown."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {cfg.name} %(levelname)s %(message)s")
    torch.set_num_threads(cfg.num_threads)
    if torch.device(cfg.engine.device).type == "cuda":
        # Triton launches on the current device, whatever its pointers say: make it this instance's.
        torch.cuda.set_device(torch.device(cfg.engine.device))
    ctx = zmq.Context()
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(cfg.router_address)
    try:
        instance = Instance(cfg, ctx, outbox)
    except Exception:
        outbox.send(encode(InstanceFailed(cfg.name, traceback.format_exc())))
        outbox.close(linger=2000)
        # Returns once the report is out (the parent reads it after seeing this exit); whatever the
        # failed construction left open is closed at once.
        ctx.destroy(linger=0)
        raise SystemExit(1) from None
    try:
        instance.serve()
    finally:
        instance.close()
        ctx.destroy(linger=0)


@dataclass
class _Pending:
    """A prefill waiting for image embeddings to arrive."""

    task: PrefillTask
    prompt: ProcessedPrompt
    missing: set[str]


class Instance:
    def __init__(
        self, cfg: InstanceConfig, ctx: zmq.Context, outbox: zmq.Socket, clock: Clock = WALL_CLOCK
    ) -> None:
        self.cfg, self.name, self.outbox, self.clock = cfg, cfg.name, outbox, clock
        self.inbox = ctx.socket(zmq.PULL)
        port = self.inbox.bind_to_random_port(f"tcp://{cfg.host}")
        self.control_address = f"tcp://{cfg.host}:{port}"
        all_roles = cfg.has(Role.ENCODE) and cfg.has(Role.PREFILL) and cfg.has(Role.DECODE)
        self.connector: Connector = make_connector(
            "local" if all_roles else cfg.transfer, device=cfg.engine.device, host=cfg.host
        )
        self.device = torch.device(cfg.engine.device)
        processor_config = ImageProcessorConfig.from_pretrained(cfg.engine.model.model)
        self.decode_pixels = PixelDecoder(processor_config, self.device)
        self.kv_sender = KVSender(self.connector)  # P side of KV hand-offs
        self.kv_parts = LayerParts()  # D side: streamed layers waiting for their hand-off
        self.aborted_before_kv = AbortedBeforeKV()  # D side: their late KV is dropped
        self.encoder = self._build_encoder() if cfg.has(Role.ENCODE) and not cfg.has(Role.PREFILL) else None
        self.mm_cache: MMCache | None = None
        self.engine = self._build_engine() if cfg.has(Role.PREFILL) or cfg.has(Role.DECODE) else None
        self.pending: dict[str, _Pending] = {}
        self.waiting_on: dict[str, list[str]] = {}  # content hash -> request ids
        self.requested: set[str] = set()  # hashes asked of the router, not yet arrived
        self.held: dict[str, set[str]] = {}  # request id -> hashes it pins in the MM cache
        self.reported_tokens: dict[str, int] = {}
        self.reported_events: dict[str, int] = {}
        self.stopping = False
        self.last_stats = 0.0
        self.transfer_totals = {"transfer_bytes_total": 0.0, "transfer_seconds_total": 0.0}

    # ---- construction -------------------------------------------------------------------------

    def _new_mm_cache(self, hidden: int) -> MMCache:
        cfg = self.cfg
        dtype = cfg.engine.model.torch_dtype
        blocks = MMCache.blocks_for_memory(cfg.mm_cache_bytes, cfg.mm_block_size, hidden, dtype)
        return MMCache(blocks, cfg.mm_block_size, hidden, dtype, self.device)

    def _build_encoder(self) -> EncoderWorker:
        mc = self.cfg.engine.model
        model = build_model(
            mc.model,
            parts=frozenset({VISION}),
            dtype=mc.torch_dtype,
            device=self.device,
            load_format=mc.load_format,
            seed=mc.seed,
        )
        cache = self._new_mm_cache(mc.hf.vision.out_hidden_size)
        return EncoderWorker(
            model,
            cache,
            self.connector,
            self.device,
            self.name,
            self.decode_pixels,
            self.cfg.max_encode_batch_patches,
            clock=self.clock,
        )

    def _build_engine(self) -> LLMEngine:
        cfg = self.cfg
        encode_locally = cfg.has(Role.ENCODE)
        if cfg.has(Role.PREFILL) and not encode_locally:
            self.mm_cache = self._new_mm_cache(cfg.engine.model.hf.text.hidden_size)
        hands_off = cfg.has(Role.PREFILL) and not cfg.has(Role.DECODE)
        return LLMEngine(
            cfg.engine,
            Tokenizer.from_pretrained(cfg.engine.model.model),
            encode_locally=encode_locally,
            mm_cache=self.mm_cache,
            handoff=self.kv_sender.handoff if hands_off else None,
            layer_sink=self.kv_sender if hands_off and cfg.kv_streaming == "layer" else None,
            instance=self.name,
            clock=self.clock,
        )

    def ready_message(self) -> InstanceReady:
        models = [m for m in (self.encoder and self.encoder.model, self.engine and self.engine.model) if m]
        params = [(n, p.numel()) for m in models for n, p in m.named_parameters()]
        vision = sum(k for n, k in params if n.startswith("visual."))
        language = sum(k for n, k in params if not n.startswith("visual."))
        max_model_len = self.engine.max_model_len if self.engine is not None else 0
        return InstanceReady(
            self.name,
            self.control_address,
            self.connector.address,
            os.getpid(),
            vision,
            language,
            max_model_len,
        )

    # ---- the loop -----------------------------------------------------------------------------

    def serve(self) -> None:
        self._send(self.ready_message())
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        for handle in self.connector.pollables():
            poller.register(handle, zmq.POLLIN)
        while not self.stopping:
            poller.poll(0 if self._has_work() else IDLE_POLL_MS)
            self.run_once()
            if os.getppid() != self.cfg.parent_pid:
                logger.warning("parent process is gone; exiting")
                return

    def run_once(self) -> None:
        """One turn of the loop, without waiting: what arrived (control first, then transfers), one
        step, stats when due. Tests drive an instance with it, in an order they choose."""
        self._receive_control()
        self._receive_transfers()
        self._step()
        self._maybe_send_stats()

    def stats(self) -> dict[str, float]:
        stats = dict(self.transfer_totals)
        if self.engine is not None:
            stats.update(self.engine.stats())
            stats.update(mm_cache_stats(self.mm_cache))
        if self.engine is not None and self.cfg.has(Role.DECODE):
            stats.update(self.kv_parts.stats())
            stats.update(self.aborted_before_kv.stats())
        if self.encoder is not None:
            stats.update(mm_cache_stats(self.encoder.cache))
            stats["encode_queue_images"] = len(self.encoder.queue)
            stats["images_encoded_total"] = self.encoder.num_encoded
        return stats

    def _maybe_send_stats(self) -> None:
        now = self.clock.monotonic()
        if now - self.last_stats >= STATS_INTERVAL_S:
            self.last_stats = now
            self._send(InstanceStats(self.name, self.stats()))

    def _has_work(self) -> bool:
        return bool(
            (self.encoder and (self.encoder.has_work() or self.encoder.done))
            or (self.engine and self.engine.has_unfinished_requests())
        )

    def _send(self, message: msgspec.Struct) -> None:
        self.outbox.send(encode(message))

    def _receive_control(self) -> None:
        while True:
            try:
                data = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(decode_for_instance(data))

    def _handle(self, msg: object) -> None:
        if isinstance(msg, EncodeTask):
            self.encoder.add(msg)
        elif isinstance(msg, PrefillTask):
            self._prefill_task(msg)
        elif isinstance(msg, ReleaseEmbedding):
            self.encoder.release(msg.content_hash)
        elif isinstance(msg, AbortRequest):
            self._abort(msg.request_id)
        elif isinstance(msg, Shutdown):
            self.stopping = True

    def _receive_transfers(self) -> None:
        for received in self.connector.poll_received():
            if received.key.startswith("mm:"):
                self._embedding_arrived(received)
            elif received.key.startswith(LAYER_KEY):
                if received.meta["request_id"] not in self.aborted_before_kv:
                    self.kv_parts.add(received)
            elif received.key.startswith(KV_KEY):
                self._kv_arrived(received)
        for result in self.connector.poll_sent():
            self.transfer_totals["transfer_bytes_total"] += result.nbytes
            self.transfer_totals["transfer_seconds_total"] += result.seconds
            if not result.ok:
                logger.error("transfer %s to %s failed: %s", result.key, result.dest, result.error)
                rid = request_of_key(result.key)
                if rid is not None:
                    self._send(RequestError(self.name, rid, f"KV transfer failed: {result.error}"))

    def _step(self) -> None:
        if self.encoder is not None:
            for done in self.encoder.step():
                self._send(done)
        if self.engine is not None and self.engine.has_unfinished_requests():
            for request in self.engine.step_requests():
                self._report(request)

    # ---- prefill side -------------------------------------------------------------------------

    def _prefill_task(self, task: PrefillTask) -> None:
        prompt = _prompt_from_task(task, self.decode_pixels)
        try:
            self.engine.check_fits(len(task.prompt_token_ids))
        except ValueError as err:
            self._send(RequestError(self.name, task.request_id, str(err)))
            return
        if task.decode_dest is not None:
            self.kv_sender.route(task.request_id, task.decode_dest)
        if self.mm_cache is None:  # encodes in-process
            self._admit(task, prompt)
            return
        missing, need = set(), []
        held = self.held.setdefault(task.request_id, set())
        for i, h in enumerate(task.image_hashes):
            if h in held or h in missing:
                continue
            if self.mm_cache.lookup(h):
                self.mm_cache.pin(h)
                held.add(h)
                continue
            missing.add(h)
            self.waiting_on.setdefault(h, []).append(task.request_id)
            if h not in self.requested:
                self.requested.add(h)
                need.append(i)
        if need:
            self._send(NeedEmbeddings(self.name, task.request_id, need))
        if missing:
            self.pending[task.request_id] = _Pending(task, prompt, missing)
        else:
            self._admit(task, prompt)

    def _embedding_arrived(self, received: Received) -> None:
        h, source = received.meta["content_hash"], received.meta["source"]
        waiters = self.waiting_on.pop(h, [])
        self.requested.discard(h)
        events = [(rid, LifetimeEvent.now(self.clock, Event.MM_TRANSFER_END, self.name)) for rid in waiters]
        self._send(EmbeddingArrived(self.name, h, source, events))
        if not self.mm_cache.put(h, received.tensors["embeds"]):
            for rid in waiters:
                self._fail(rid, "the MM cache of this prefill instance is full (raise mm_cache_bytes)")
            return
        for rid in waiters:
            pending = self.pending.get(rid)
            if pending is None:
                continue  # aborted meanwhile
            self.mm_cache.pin(h)
            self.held.setdefault(rid, set()).add(h)
            pending.missing.discard(h)
            if not pending.missing:
                del self.pending[rid]
                self._admit(pending.task, pending.prompt)
        self.mm_cache.unpin(h)  # the arrival's own pin: the waiters hold theirs

    def _admit(self, task: PrefillTask, prompt: ProcessedPrompt) -> None:
        self.engine.add_request(task.request_id, prompt, task.params, task.arrival_time)

    # ---- decode side --------------------------------------------------------------------------

    def _kv_arrived(self, received: Received) -> None:
        meta = received.meta
        rid = meta["request_id"]
        if self.aborted_before_kv.drop_handoff(rid):
            self.kv_parts.drop(rid)
            return  # the router finished it as aborted already: nothing to report
        try:
            kv = self.kv_parts.complete(received)
        except ValueError as err:
            self._send(RequestError(self.name, rid, f"KV transfer incomplete: {err}"))
            return
        if kv is None:
            return  # a discard notice: the request ended at its first token on P
        task = PrefillTask(
            rid,
            meta["prompt_token_ids"],
            [tuple(p) for p in meta["placeholders"]],
            meta["image_hashes"],
            [tuple(g) for g in meta["grids"]],
            msgspec.convert(meta["params"], SamplingParams),
            meta["arrival_time"],
            None,
            meta["prompt"],
        )
        logprobs = meta["first_logprobs"]
        if logprobs is not None:
            logprobs = msgspec.convert(logprobs, PositionLogprobs, strict=False)
        try:
            request = self.engine.add_handoff(
                rid,
                _prompt_from_task(task),
                task.params,
                meta["first_token"],
                logprobs,
                kv,
                received.tensors.get("generator_state"),
                task.arrival_time,
            )
        except ValueError as err:
            self._send(RequestError(self.name, rid, str(err)))
            return
        request.record(Event.KV_TRANSFER_END, self.clock.now(), self.name)
        self.reported_tokens[rid] = 1  # the prefill instance reported the first token

    # ---- reporting ----------------------------------------------------------------------------

    def _report(self, request: Request) -> None:
        rid = request.request_id
        n_tok, n_ev = self.reported_tokens.get(rid, 0), self.reported_events.get(rid, 0)
        finished = request.finish_reason is not None
        handed_off = not finished and rid not in self.engine.requests
        logprobs = request.output_logprobs[n_tok:] if request.params.logprobs is not None else None
        self._send(
            RequestUpdate(
                self.name,
                rid,
                request.output_token_ids[n_tok:],
                logprobs,
                request.metrics.events[n_ev:],
                request.finish_reason,
                request.stop_reason,
                request.output_text if finished else None,
                request.num_cached_tokens,
                handed_off,
                n_tok,
            )
        )
        self.reported_tokens[rid] = len(request.output_token_ids)
        self.reported_events[rid] = len(request.metrics.events)
        if len(request.output_token_ids) >= 1:
            self._unpin_images(rid)  # prefill is done: the request holds its own copies now
        if finished:
            self.kv_sender.forget(rid)
        if finished or handed_off:
            self.reported_tokens.pop(rid, None)
            self.reported_events.pop(rid, None)

    def _unpin_images(self, rid: str) -> None:
        for h in self.held.pop(rid, ()):
            self.mm_cache.unpin(h)

    def _abort(self, rid: str) -> None:
        if self._may_still_receive_kv(rid):
            self.aborted_before_kv.remember(rid)
        if self.engine is not None:
            self.engine.abort_request(rid)
        pending = self.pending.pop(rid, None)
        if pending is not None:
            for h in pending.missing:
                if rid in self.waiting_on.get(h, []):
                    self.waiting_on[h].remove(rid)
        if self.mm_cache is not None:
            self._unpin_images(rid)
        self.kv_sender.forget(rid)
        self.kv_parts.drop(rid)
        self.reported_tokens.pop(rid, None)
        self.reported_events.pop(rid, None)

    def _may_still_receive_kv(self, rid: str) -> bool:
        """A decode instance that does not run the request yet may still get its KV from P: the
        abort and the KV take different paths, so the abort can overtake it."""
        if self.engine is None or not self.cfg.has(Role.DECODE):
            return False
        return rid not in self.engine.requests and rid not in self.pending

    def _fail(self, rid: str, error: str) -> None:
        self._abort(rid)
        self._send(RequestError(self.name, rid, error))

    def close(self) -> None:
        self.connector.close()
        self.inbox.close(linger=0)
        self.outbox.close(linger=1000)


def _prompt_from_task(task: PrefillTask, decode_pixels: PixelDecoder | None = None) -> ProcessedPrompt:
    """The prompt as the language model needs it; without `task.pixels` (the images are
    encoded on another instance) the pixel tensors stay empty."""
    if task.pixels:
        pixels = [decode_pixels(item) for item in task.pixels]
    else:
        pixels = [torch.empty(0)] * len(task.grids)
    images = [ImageInput(px, tuple(g), h) for px, g, h in zip(pixels, task.grids, task.image_hashes)]
    placeholders = [PlaceholderRange(o, n) for o, n in task.placeholders]
    return ProcessedPrompt(list(task.prompt_token_ids), images, placeholders, task.prompt)

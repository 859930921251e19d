"""The instance core: the stage managers of its roles, one shared engine, no sockets.

It takes control messages (`on_message`), transfers (`on_transfer`, or `receive_transfers` to
poll its connector) and turns (`step`), and answers through an `Outbox`. The ZMQ process loop
(shell.py) and in-memory drivers (tests, the simulator) give it I/O. Its id (`instance_id`, the
name it started with: "P0") never changes; its roles may (`SetRoles`, rules in roles.py).

Messages and transfers go to the stage that handles them:

| input                         | goes to                                                   |
|-------------------------------|-----------------------------------------------------------|
| EncodeTask, ReleaseEmbedding, | encode stage                                              |
| DestinationGone               |                                                           |
| PrefillTask, EmbeddingsLost,  | prefill stage                                             |
| `mm:` transfers               |                                                           |
| `kv:`, `kvl:` transfers       | decode stage                                              |
| AbortRequest                  | every stage (decode first), then the engine               |
| SetRoles, Shutdown            | the core itself                                           |
| a send's result: `mm:` failed | encode stage (unpins; the router hears `EmbeddingNotSent`)|
| a send's result: `kv:` failed | the router, as a RequestError (it re-places the request)  |
| a PatchPool job ended         | wakes the shell's poller; the next step picks it up       |

What it computes with is injected (`Compute`): the checkpoint's model by default; tests and the
simulator give scripted or cost-model compute (epd.engine.scripted_runner, epd.sim).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from epd.clock import WALL_CLOCK, Clock
from epd.cluster.encoder_worker import PixelDecoder
from epd.cluster.instance.config import InstanceConfig
from epd.cluster.instance.decode_stage import DecodeStage
from epd.cluster.instance.encode_stage import (
    EncodeStage,
    VisionFactory,
    build_encoder_worker,
    load_vision_tower,
)
from epd.cluster.instance.engine_host import EngineHost, EngineWiring, build_engine, wiring_for
from epd.cluster.instance.prefill_stage import PrefillStage
from epd.cluster.instance.roles import Loaded, parse_roles, refusal
from epd.cluster.instance.stage import Outbox, StageManager
from epd.cluster.kv_handoff import KV_KEY, LAYER_KEY, KVSender, request_of_key
from epd.cluster.layout import Role, role_letters
from epd.cluster.messages import (
    AbortRequest,
    DestinationGone,
    EmbeddingsLost,
    EncodeTask,
    InstanceReady,
    InstanceStats,
    PrefillTask,
    ReleaseEmbedding,
    RequestError,
    SetRoles,
    SetRolesReply,
    Shutdown,
)
from epd.engine.factory import PartsFactory, load_model_parts
from epd.engine.llm_engine import LLMEngine
from epd.engine.mm_cache import MMCache
from epd.inputs.image_processor import ImageProcessorConfig
from epd.inputs.patches import PatchPool
from epd.transfer.base import Connector, Received, SendResult
from epd.transfer.retry import connector_stats

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.25


@dataclass(frozen=True)
class Compute:
    """What an instance computes with: the engine's runner (`parts`) and, for an encoder-only
    instance, its vision tower (`vision`; an engine that encodes in-process gets it from `parts`)."""

    parts: PartsFactory = load_model_parts
    vision: VisionFactory = load_vision_tower


MODEL_COMPUTE = Compute()  # the checkpoint's weights (or dummy ones, by its load format)


class InstanceCore:
    def __init__(
        self,
        cfg: InstanceConfig,
        connector: Connector,
        outbox: Outbox,
        clock: Clock = WALL_CLOCK,
        compute: Compute = MODEL_COMPUTE,
    ) -> None:
        self.cfg, self.connector, self.outbox, self.clock = cfg, connector, outbox, clock
        self.compute = compute
        self.instance_id = cfg.name  # fixed here: a later role change keeps it ("P0" may decode)
        self.roles: frozenset[Role] = frozenset(cfg.spec.roles)
        self.device = torch.device(cfg.engine.device)
        processor_config = ImageProcessorConfig.from_pretrained(cfg.engine.model.model)
        # Image files are decoded where they are encoded: here, on threads of our own.
        self.patch_pool = PatchPool() if cfg.has(Role.ENCODE) else None
        self.decode_pixels = PixelDecoder(processor_config, self.device, self.patch_pool)
        self.kv_sender = KVSender(connector)  # P side of KV hand-offs
        self.encode = self._build_encode_stage()
        self.mm_cache: MMCache | None = None  # embeddings from encoder instances (P without E)
        if cfg.has(Role.PREFILL) and not cfg.has(Role.ENCODE):
            self.mm_cache = self._new_mm_cache(cfg.engine.model.hf.mm_embed_width)
        self.llm: EngineHost | None = None  # the language model, shared by the P and D stages
        if cfg.has(Role.PREFILL) or cfg.has(Role.DECODE):
            engine = build_engine(cfg, self._wiring(self.roles), clock, compute.parts)
            self.llm = EngineHost(engine, self.instance_id, outbox)
        self.loaded = Loaded(self.llm is not None, cfg.has(Role.ENCODE), connector.name == "local")
        self.prefill: PrefillStage | None = None
        self.decode: DecodeStage | None = None
        self._build_language_stages()
        self.stopping = False
        self.last_stats = 0.0
        self.transfer_totals = {"transfer_bytes_total": 0.0, "transfer_seconds_total": 0.0}

    # ---- construction -------------------------------------------------------------------------

    def _build_encode_stage(self) -> EncodeStage | None:
        """An encoder-only stage, unless the engine encodes in-process (E with P)."""
        cfg = self.cfg
        if not cfg.has(Role.ENCODE) or cfg.has(Role.PREFILL):
            return None
        cache = self._new_mm_cache(cfg.engine.model.hf.mm_embed_width)
        worker = build_encoder_worker(
            cfg, cache, self.connector, self.decode_pixels, self.clock, self.compute.vision
        )
        return EncodeStage(worker, self.outbox)

    def _new_mm_cache(self, hidden: int) -> MMCache:
        cfg = self.cfg
        dtype = cfg.engine.model.torch_dtype
        blocks = MMCache.blocks_for_memory(cfg.mm_cache_bytes, cfg.mm_block_size, hidden, dtype)
        return MMCache(blocks, cfg.mm_block_size, hidden, dtype, self.device)

    def _wiring(self, roles: frozenset[Role]) -> EngineWiring:
        return wiring_for(roles, self.kv_sender, self.mm_cache, self.cfg.kv_streaming)

    def _build_language_stages(self) -> None:
        """The P and D stages of the current roles, around the one engine (kept across changes)."""
        self.prefill = self.decode = None
        if self.llm is None:
            return
        if Role.PREFILL in self.roles:
            self.prefill = PrefillStage(
                self.instance_id,
                self.llm,
                self.mm_cache,
                self.kv_sender,
                self.decode_pixels,
                self.outbox,
                self.clock,
            )
        if Role.DECODE in self.roles:
            self.decode = DecodeStage(
                self.instance_id, self.llm, self.outbox, self.clock, self._prefill_waits
            )

    def _prefill_waits(self, request_id: str) -> bool:
        return self.prefill is not None and self.prefill.is_waiting(request_id)

    def ready_message(self, control_address: str) -> InstanceReady:
        models = [
            m for m in (self.encode and self.encode.worker.model, self.engine and self.engine.model) if m
        ]
        params = [(n, p.numel()) for m in models for n, p in m.named_parameters()]
        vision = sum(k for n, k in params if n.startswith("visual."))
        language = sum(k for n, k in params if not n.startswith("visual."))
        max_model_len = self.engine.max_model_len if self.engine is not None else 0
        return InstanceReady(
            self.instance_id,
            control_address,
            self.connector.address,
            os.getpid(),
            vision,
            language,
            max_model_len,
        )

    @property
    def engine(self) -> LLMEngine | None:
        return self.llm.engine if self.llm is not None else None

    def pollables(self) -> list[int]:
        """File descriptors besides the inbox and the connector that mean "work is ready"."""
        return [self.patch_pool.fileno()] if self.patch_pool is not None else []

    def close(self) -> None:
        if self.patch_pool is not None:
            self.patch_pool.close()

    def stages(self) -> list[StageManager]:
        """The stage managers held now; decode before prefill (see `_abort`)."""
        return [s for s in (self.encode, self.decode, self.prefill) if s is not None]

    # ---- inputs -------------------------------------------------------------------------------

    def on_message(self, msg: object) -> None:
        if isinstance(msg, (EncodeTask, ReleaseEmbedding, DestinationGone)):
            self._to_stage(self.encode, Role.ENCODE, msg)
        elif isinstance(msg, (PrefillTask, EmbeddingsLost)):
            self._to_stage(self.prefill, Role.PREFILL, msg)
        elif isinstance(msg, AbortRequest):
            self._abort(msg.request_id)
        elif isinstance(msg, SetRoles):
            self.outbox.send(self.set_roles(msg.roles))
        elif isinstance(msg, Shutdown):
            self.stopping = True

    def _to_stage(
        self,
        stage: StageManager | None,
        role: Role,
        msg: EncodeTask | ReleaseEmbedding | DestinationGone | PrefillTask | EmbeddingsLost,
    ) -> None:
        if stage is not None:
            stage.on_message(msg)
            return
        error = f"{self.instance_id} does not hold {role.value} (its roles: {role_letters(self.roles)})"
        request_id = getattr(msg, "request_id", None)
        if request_id is None:
            logger.error("%s: dropped %s", error, type(msg).__name__)
        else:
            self.outbox.send(RequestError(self.instance_id, request_id, error))

    def on_transfer(self, received: Received) -> None:
        stage: StageManager | None = None
        if received.key.startswith("mm:"):
            stage = self.prefill
        elif received.key.startswith((LAYER_KEY, KV_KEY)):
            stage = self.decode
        if stage is None:
            logger.error("%s: no stage takes transfer %s; dropped", self.instance_id, received.key)
            return
        stage.on_transfer(received)

    def receive_transfers(self) -> None:
        """What the connector received, each to its stage; and what it finished sending."""
        for received in self.connector.poll_received():
            self.on_transfer(received)
        for result in self.connector.poll_sent():
            self._sent(result)

    def _sent(self, result: SendResult) -> None:
        self.transfer_totals["transfer_bytes_total"] += result.nbytes
        self.transfer_totals["transfer_seconds_total"] += result.seconds
        if not result.ok:
            logger.error("transfer %s to %s failed: %s", result.key, result.dest, result.error)
            if result.key.startswith("mm:") and self.encode is not None:
                self.encode.not_sent(result)  # P asks again, through the router
                return
            rid = request_of_key(result.key)
            if rid is not None:
                self.outbox.send(RequestError(self.instance_id, rid, f"KV transfer failed: {result.error}"))

    def _abort(self, request_id: str) -> None:
        # The decode stage goes first: whether the request's KV may still come depends on the
        # engine not having it yet.
        for stage in self.stages():
            stage.abort(request_id)
        if self.llm is not None:
            self.llm.abort(request_id)

    # ---- turns --------------------------------------------------------------------------------

    def step(self) -> None:
        """One turn: encode a batch, step the engine (reporting what advanced), stats when due."""
        if self.patch_pool is not None:
            self.patch_pool.clear()  # before looking at the patches: a job ending now wakes us again
        if self.encode is not None:
            self.encode.step()
        if self.prefill is not None:
            self.prefill.step()  # admits EP tasks whose patches are made
        if self.llm is not None:
            for request in self.llm.step():
                if self.prefill is not None:
                    self.prefill.on_advanced(request)
        self._maybe_send_stats()

    def has_work(self) -> bool:
        return any(stage.has_work() for stage in self.stages()) or (
            self.llm is not None and self.llm.has_work()
        )

    def stats(self) -> dict[str, float]:
        stats = {**self.transfer_totals, **connector_stats(self.connector)}
        if self.llm is not None:
            stats.update(self.llm.engine.stats())
        for stage in (self.prefill, self.decode, self.encode):
            if stage is not None:
                stats.update(stage.stats())
        return stats

    def _maybe_send_stats(self) -> None:
        now = self.clock.monotonic()
        if now - self.last_stats >= STATS_INTERVAL_S:
            self.last_stats = now
            self.outbox.send(InstanceStats(self.instance_id, self.stats()))

    # ---- roles --------------------------------------------------------------------------------

    def set_roles(self, letters: str) -> SetRolesReply:
        """Switch to the roles `letters` names if the rules allow it now (roles.py); the reply says."""
        try:
            wanted = parse_roles(letters)
        except ValueError as err:
            return SetRolesReply(self.instance_id, role_letters(self.roles), str(err))
        error = refusal(self.instance_id, self.roles, wanted, self.loaded, self._busy())
        if error is not None:
            return SetRolesReply(self.instance_id, role_letters(self.roles), error)
        if wanted != self.roles:
            self._switch_language_roles(wanted)
        return SetRolesReply(self.instance_id, role_letters(self.roles))

    def _busy(self) -> dict[str, int]:
        busy = {"engine": self.llm.busy_requests() if self.llm is not None else 0}
        for name, stage in (("prefill", self.prefill), ("decode", self.decode)):
            busy[name] = stage.busy_requests() if stage is not None else 0
        return busy

    def _switch_language_roles(self, wanted: frozenset[Role]) -> None:
        """P and D around the same engine: only its hand-off and embedding source change."""
        if Role.PREFILL in wanted and Role.ENCODE not in wanted and self.mm_cache is None:
            self.mm_cache = self._new_mm_cache(self.cfg.engine.model.hf.mm_embed_width)
        self.roles = wanted
        self.llm.rewire(self._wiring(wanted))
        self._build_language_stages()
        logger.info("%s now holds %s", self.instance_id, role_letters(wanted))

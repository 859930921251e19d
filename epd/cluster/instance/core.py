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
| MigrateRequest                | decode stage (its KV leaves for another D: a role switch) |
| AbortRequest                  | every stage (decode first), then the engine               |
| SetRoles, Shutdown            | the core itself                                           |
| a send's result: `mm:` failed | encode stage (unpins; the router hears `EmbeddingNotSent`)|
| a send's result: `kv:` failed | the router, as a RequestError (it re-places the request)  |
| a PatchPool job ended         | wakes the shell's poller; the next step picks it up       |

What it computes with is injected (`Compute`): the checkpoint's model by default; tests and the
simulator give scripted or cost-model compute (epd.engine.scripted_runner, epd.sim). Started with
`switchable_roles`, it keeps both parts of the checkpoint in host memory (host_weights.py) and
builds each part from there, at start and whenever a role switch needs it.

What it holds follows its roles; a switch keeps what the new roles share with the old and
rebuilds the rest (`set_roles`):

| part                         | held while the roles include           | a switch that changes it   |
|------------------------------|----------------------------------------|----------------------------|
| encode stage (vision tower,  | E without P                            | frees it, or builds it from|
| its MM cache)                |                                        | the host copy              |
| engine (language model, KV   | P or D (with the vision tower: and E)  | P <-> D: kept, rewired;    |
| cache)                       |                                        | else freed or built        |
| MM cache of embeddings from  | P without E                            | made or freed              |
| encoders                     |                                        |                            |

Parts are freed before any is built, so the memory one gives back (an encoder's MM cache, a KV
cache) is there for the next; the reply says how long the weights took to copy and the rest.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass

import torch

from epd.clock import WALL_CLOCK, Clock
from epd.cluster.instance.config import InstanceConfig
from epd.cluster.instance.decode_stage import DecodeStage
from epd.cluster.instance.encode_stage import (
    EncodeStage,
    VisionFactory,
    build_encoder_worker,
    load_vision_tower,
)
from epd.cluster.instance.engine_host import EngineHost, EngineWiring, build_engine, wiring_for
from epd.cluster.instance.host_weights import HostWeights
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
    MigrateRequest,
    MigrationRefused,
    PrefillTask,
    ReleaseEmbedding,
    RequestError,
    SetRoles,
    SetRolesReply,
    Shutdown,
)
from epd.cluster.pixel_decoder import PixelDecoder
from epd.engine.factory import PartsFactory, load_model_parts
from epd.engine.llm_engine import LLMEngine
from epd.engine.mm_cache import MMCache
from epd.inputs.image_processor import ImageProcessorConfig
from epd.inputs.patches import PatchPool
from epd.parallel.runner import ParallelRunner
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
        self.instance_id = cfg.name  # fixed here: a later role change keeps it ("P0" may decode)
        self.roles: frozenset[Role] = frozenset(cfg.spec.roles)
        self.device = torch.device(cfg.engine.device)
        self.host: HostWeights | None = None  # both parts in host memory (switchable_roles)
        if cfg.switchable_roles and compute == MODEL_COMPUTE:
            self.host = HostWeights(cfg.engine.model, self.device)
            compute = Compute(self.host.model_parts, self.host.vision_tower)
        self.compute = compute
        processor_config = ImageProcessorConfig.from_pretrained(cfg.engine.model.model)
        # Image files are decoded where they are encoded: here, on threads of our own (made at start
        # where E may come later: the shell polls the pool's descriptor from the start).
        self.patch_pool = PatchPool() if cfg.has(Role.ENCODE) or cfg.switchable_roles else None
        self.decode_pixels = PixelDecoder(processor_config, self.device, self.patch_pool)
        self.kv_sender = KVSender(connector)  # P side of KV hand-offs (and D's, migrating)
        self.encode = self._build_encode_stage() if _needs_encoder(self.roles) else None
        self.mm_cache: MMCache | None = None  # embeddings from encoder instances (P without E)
        if _needs_mm_cache(self.roles):
            self.mm_cache = self._new_mm_cache(cfg.engine.model.hf.mm_embed_width)
        self.llm: EngineHost | None = None  # the language model, shared by the P and D stages
        self.llm_has_vision = cfg.has(Role.ENCODE)  # the engine's model holds the vision tower too
        if _needs_engine(self.roles):
            self.llm = self._build_llm(self.llm_has_vision)
        self.loaded = Loaded(
            self.llm is not None, cfg.has(Role.ENCODE), connector.name == "local", cfg.switchable_roles
        )
        self.prefill: PrefillStage | None = None
        self.decode: DecodeStage | None = None
        self._build_language_stages()
        self.stopping = False
        self.last_stats = 0.0
        self.transfer_totals = {"transfer_bytes_total": 0.0, "transfer_seconds_total": 0.0}
        self.requests_migrated_total = 0  # decodes sent to other instances (role switches)

    # ---- construction -------------------------------------------------------------------------

    def _build_encode_stage(self) -> EncodeStage:
        """An encoder-only stage (E without P: with P the engine encodes in-process)."""
        cfg = self.cfg
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

    def _build_llm(self, with_vision: bool) -> EngineHost:
        wiring = self._wiring(self.roles)
        engine = build_engine(self.cfg, wiring, self.clock, self.compute.parts, with_vision)
        return EngineHost(engine, self.instance_id, self.outbox)

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
                self.instance_id, self.llm, self.outbox, self.clock, self._prefill_waits, self.kv_sender
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
            self.loaded.host_copy,
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
        elif isinstance(msg, MigrateRequest):
            self._migrate(msg)
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
        if isinstance(msg, (ReleaseEmbedding, DestinationGone)):
            # About copies an encoder sent before this instance dropped E: nothing holds them now.
            logger.debug("%s: %s about a dropped MM cache ignored", self.instance_id, type(msg).__name__)
        elif request_id is None:
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
        for result in self._worker_sends():
            self._sent(result)

    def _worker_sends(self) -> list[SendResult]:
        """What the workers of a tensor-parallel P finished sending: their heads of hand-offs."""
        runner = None if self.llm is None else self.llm.engine.runner
        return runner.poll_worker_sends() if isinstance(runner, ParallelRunner) else []

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

    def _migrate(self, msg: MigrateRequest) -> None:
        if self.decode is None:
            roles = role_letters(self.roles)
            error = f"cannot migrate: {self.instance_id} does not decode (its roles: {roles})"
            self.outbox.send(MigrationRefused(self.instance_id, msg.request_id, error))
            return
        if self.decode.migrate(msg.request_id, msg.dest):
            self.requests_migrated_total += 1

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
        stats["requests_migrated_total"] = self.requests_migrated_total
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
        """Switch to the roles `letters` names if the rules allow it now (roles.py); the reply says,
        with the seconds spent copying weights and freeing or making caches."""
        try:
            wanted = parse_roles(letters)
        except ValueError as err:
            return SetRolesReply(self.instance_id, role_letters(self.roles), str(err))
        error = refusal(self.instance_id, self.roles, wanted, self.loaded, self._busy())
        if error is not None:
            return SetRolesReply(self.instance_id, role_letters(self.roles), error)
        timings: dict[str, float] = {}
        if wanted != self.roles:
            timings = self._switch_parts(wanted)
            logger.info("%s now holds %s (%s)", self.instance_id, role_letters(wanted), timings)
        return SetRolesReply(self.instance_id, role_letters(self.roles), None, timings)

    def _busy(self) -> dict[str, int]:
        busy = {"engine": self.llm.busy_requests() if self.llm is not None else 0}
        for name, stage in (("prefill", self.prefill), ("decode", self.decode), ("encode", self.encode)):
            busy[name] = stage.busy_requests() if stage is not None else 0
        return busy

    def _switch_parts(self, wanted: frozenset[Role]) -> dict[str, float]:
        """Free the parts `wanted` does not use, then build those it lacks (module docstring). The
        seconds spent copying weights and on the rest; none where no part was freed or built (P <->
        D: the engine keeps its weights and KV cache and is only rewired)."""
        started = time.perf_counter()
        rebuilt = self._free_parts(wanted)
        weights = 0.0
        if _needs_mm_cache(wanted) and self.mm_cache is None:  # before the engine: it reads from it
            self.mm_cache = self._new_mm_cache(self.cfg.engine.model.hf.mm_embed_width)
        self.roles = wanted
        if _needs_encoder(wanted) and self.encode is None:
            self.encode, rebuilt = self._build_encode_stage(), True
            weights += self._last_copy_seconds()
        if _needs_engine(wanted) and self.llm is None:
            self.llm_has_vision = Role.ENCODE in wanted
            self.llm, rebuilt = self._build_llm(self.llm_has_vision), True
            weights += self._last_copy_seconds()
        if self.llm is not None:
            self.llm.rewire(self._wiring(wanted))
        self._build_language_stages()
        if not rebuilt:
            return {}
        return {"weights": weights, "memory": time.perf_counter() - started - weights}

    def _free_parts(self, wanted: frozenset[Role]) -> bool:
        """Drop what the new roles do not use, so that its memory is there for what they need;
        whether anything was dropped."""
        freed = False
        if self.encode is not None and not _needs_encoder(wanted):
            self.encode, freed = None, True
        keep_engine = _needs_engine(wanted) and self.llm_has_vision == (Role.ENCODE in wanted)
        if self.llm is not None and not keep_engine:
            self.llm.engine.shutdown()
            self.llm = self.prefill = self.decode = None
            freed = True
        # Kept by P -> D (the engine stays, a later D -> P reads from it again); else with the engine.
        if self.mm_cache is not None and not _needs_mm_cache(wanted) and not keep_engine:
            self.mm_cache = self.prefill = None
            freed = True
        if freed:
            gc.collect()  # the caches and weights go now, not at some later collection
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return freed

    def _last_copy_seconds(self) -> float:
        return self.host.copy_seconds if self.host is not None else 0.0


def _needs_encoder(roles: frozenset[Role]) -> bool:
    return Role.ENCODE in roles and Role.PREFILL not in roles


def _needs_engine(roles: frozenset[Role]) -> bool:
    return Role.PREFILL in roles or Role.DECODE in roles


def _needs_mm_cache(roles: frozenset[Role]) -> bool:
    return Role.PREFILL in roles and Role.ENCODE not in roles

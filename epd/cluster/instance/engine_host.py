"""The language model of an instance, shared by its prefill and decode stages.

An instance holding P, D or both owns one `LLMEngine`; the core steps it once per turn, whichever
stages feed it, and reports each advanced request to the router as a diff (`RequestUpdate`).
How the engine ends a prefill follows the roles (`EngineWiring`), and changes with them:

| roles now          | after the first token            | image embeddings from          |
|--------------------|----------------------------------|--------------------------------|
| P, EP (no D)       | hand the KV off (whole or layers)| MM cache (P), vision tower (EP)|
| PD, EPD            | decode here                      | MM cache (PD), vision tower    |
| D                  | - (requests arrive with KV)      | none                           |
"""

from __future__ import annotations

from dataclasses import dataclass

from epd.clock import Clock
from epd.cluster.instance.config import InstanceConfig
from epd.cluster.instance.stage import Outbox
from epd.cluster.kv_handoff import KVSender
from epd.cluster.layout import Role
from epd.cluster.messages import RequestError, RequestUpdate
from epd.engine.factory import PartsFactory, load_model_parts
from epd.engine.llm_engine import HandOff, LLMEngine
from epd.engine.mm_cache import MMCache
from epd.engine.request import Request
from epd.inputs.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineWiring:
    """What the engine is told about its neighbours for a set of roles."""

    handoff: HandOff | None
    layer_sink: KVSender | None
    mm_cache: MMCache | None  # None: embeddings come from the vision tower (EP) or never (D)


def wiring_for(
    roles: frozenset[Role], kv_sender: KVSender, mm_cache: MMCache | None, kv_streaming: str
) -> EngineWiring:
    hands_off = Role.PREFILL in roles and Role.DECODE not in roles
    return EngineWiring(
        kv_sender.handoff if hands_off else None,
        kv_sender if hands_off and kv_streaming == "layer" else None,
        mm_cache if Role.PREFILL in roles and Role.ENCODE not in roles else None,
    )


def build_engine(
    cfg: InstanceConfig,
    wiring: EngineWiring,
    clock: Clock,
    parts: PartsFactory = load_model_parts,
    encode_locally: bool | None = None,
) -> LLMEngine:
    """The instance's engine, computing with what `parts` builds (by default the checkpoint's model).
    `encode_locally`: it holds the vision tower too (default: it was started with E)."""
    return LLMEngine(
        cfg.engine,
        Tokenizer.from_pretrained(cfg.engine.model.model),
        encode_locally=cfg.has(Role.ENCODE) if encode_locally is None else encode_locally,
        mm_cache=wiring.mm_cache,
        handoff=wiring.handoff,
        layer_sink=wiring.layer_sink,
        instance=cfg.name,
        clock=clock,
        model_parts=parts,
    )


class EngineHost:
    """Steps the shared engine and reports what advanced, sending only what is new since last time."""

    def __init__(self, engine: LLMEngine, instance_id: str, outbox: Outbox) -> None:
        self.engine, self.instance_id, self.outbox = engine, instance_id, outbox
        self.reported_tokens: dict[str, int] = {}
        self.reported_events: dict[str, int] = {}

    def step(self) -> list[Request]:
        """One engine step (if it has work); every advanced request is reported before it returns."""
        if not self.engine.has_unfinished_requests():
            return []
        advanced = self.engine.step_requests()
        for request in advanced:
            self._report(request)
        for out in self.engine.take_rejected():  # --reject-late: the router answers 429
            self.outbox.send(
                RequestError(self.instance_id, out.request_id, out.error or "", retry_after=out.retry_after)
            )
            self._forget(out.request_id)
        return advanced

    def continues_at(self, request_id: str, num_tokens: int) -> None:
        """The request arrived with `num_tokens` outputs that another instance reported already."""
        self.reported_tokens[request_id] = num_tokens

    def hand_over(self, request: Request) -> None:
        """The request leaves this engine unfinished (migrated elsewhere): its blocks are freed and
        its last update says so (`handed_off`)."""
        self.engine.scheduler.finish(request)
        self.engine.requests.pop(request.request_id, None)
        self._report(request)

    def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._forget(request_id)

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def busy_requests(self) -> int:
        # An aborted request whose images are still encoding ahead holds the tower until they are.
        ahead = self.engine.ahead
        return len(self.engine.requests) + (ahead.pending if ahead is not None else 0)

    def rewire(self, wiring: EngineWiring) -> None:
        """Point a running, idle engine at the neighbours of new roles, keeping its weights and caches."""
        self.engine.rewire(wiring.handoff, wiring.layer_sink, wiring.mm_cache)

    def _report(self, request: Request) -> None:
        rid = request.request_id
        n_tok, n_ev = self.reported_tokens.get(rid, 0), self.reported_events.get(rid, 0)
        finished = request.finish_reason is not None
        handed_off = not finished and rid not in self.engine.requests
        logprobs = request.output_logprobs[n_tok:] if request.params.logprobs is not None else None
        self.outbox.send(
            RequestUpdate(
                self.instance_id,
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
        if finished or handed_off:
            self._forget(rid)

    def _forget(self, request_id: str) -> None:
        self.reported_tokens.pop(request_id, None)
        self.reported_events.pop(request_id, None)

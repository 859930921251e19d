"""One engine instance: `schedule() -> run() -> postprocess()` per step.

The same engine serves every role that holds the language model; what differs is
injected, not branched on:
- where image embeddings come from (`mm_cache` given: from encoder instances; else the
  vision tower in this process),
- what happens after the first token (`handoff` given: the KV goes to a decode instance;
  else this engine decodes); with `layer_sink` too, the KV goes out layer by layer during
  the prefill forward instead (`epd.engine.layer_stream`),
- requests may arrive with their KV already computed (`add_handoff`, decode instances).

Prefill is chunked (epd.engine.scheduler) where the engine decodes: one token budget per step,
shared by the running decodes and prefill chunks, so a long prompt never stalls the decodes for
its whole prefill. An engine that hands its KV off (`handoff`) prefills whole prompts, one
step each: it runs no decodes to protect, chunks would only add steps before the hand-off
(TTFT), and its KV transfer, whole after the prefill step or layer by layer during its forward
(epd.engine.layer_stream), is built around the one forward that computes the prompt.
A step that computes only part of a request's prompt samples nothing for it and reports nothing
(`step` returns only the requests that got a token).
With `async_scheduling`, pure decode steps are launched before the host reads the last one's tokens,
and a step reports the tokens of the step before (epd.engine.async_scheduling); outputs are the same.
With `encode_ahead` (by default where the vision tower runs on CUDA), new requests' images are
encoded beside the steps (epd.engine.encode_ahead), and a request reaches the scheduler once they
are in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from epd.clock import WALL_CLOCK, Clock
from epd.config import EngineConfig, SchedulerConfig
from epd.engine.async_scheduling import AsyncStepper
from epd.engine.block_manager import BlockManager
from epd.engine.embedders import CachedEmbeddings, ImageEmbedder, LocalEncoder, NoEmbeddings
from epd.engine.encode_ahead import AheadTower, EncodeAhead
from epd.engine.factory import PartsFactory, choose_embedder, load_model_parts
from epd.engine.layer_stream import LayerSink, LayerStreamer, NoLayerStreaming
from epd.engine.mm_cache import MMCache
from epd.engine.request import Request, RequestStatus
from epd.engine.sampler import Sampler
from epd.engine.scheduler import ScheduledBatch, Scheduler
from epd.engine.step_estimator import StepEstimator, make_step_estimator
from epd.engine.stop import refresh_text, update_text_and_check_stop
from epd.inputs.image_processor import ImageProcessorConfig
from epd.inputs.patches import PatchPool
from epd.inputs.tokenizer import Tokenizer
from epd.inputs.types import ProcessedPrompt
from epd.lifetime import Event
from epd.models.vision_graphs import VisionGraphs
from epd.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from epd.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Called with a request that just got its first token and a copy of its KV (None: the KV was
# streamed layer by layer already), as the runner's `handoff_kv` gives it (a tensor-parallel
# runner: its ranks' pieces, epd.parallel.kv.HeadShares); the engine then frees the request's
# blocks and forgets it.
HandOff = Callable[[Request, Any], None]
# How long a step with nothing to run waits for images encoded ahead (it ends early on `wake` or
# when one is in): short, so an entry point's loop still reads new requests between waits.
ENCODED_WAIT_S = 0.01
MAX_GRAPH_PATCHES = 32768  # the largest batch encode-ahead replays as a graph (--vision-cuda-graphs)


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Tokenizer,
        *,
        encode_locally: bool = True,
        mm_cache: MMCache | None = None,
        handoff: HandOff | None = None,
        layer_sink: LayerSink | None = None,
        instance: str | None = None,
        clock: Clock = WALL_CLOCK,
        model_parts: PartsFactory = load_model_parts,
        step_estimator: StepEstimator | None = None,
    ) -> None:
        """`encode_locally`: this process holds the vision tower; else embeddings come from
        `mm_cache` (filled by encoder instances), or, with no cache, never (decode-only).
        `layer_sink` (with `handoff` only): stream each prefilled layer's KV to it.
        `model_parts`: what computes (epd.engine.factory): the model by default.
        `step_estimator`: predicts step times for SLO scheduling (epd.engine.step_estimator);
        default: --slo-profile's cost model, else fitted to this engine's own steps."""
        self.config, self.tokenizer, self.handoff, self.instance = config, tokenizer, handoff, instance
        self.clock = clock
        self._patch_pool: PatchPool | None = None  # made on the first image file (prepare_images)
        self._image_config: ImageProcessorConfig | None = None
        mc, cc = config.model, config.cache
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # Triton kernels launch on the current device
        # The effective policy, so that a prefill-only engine's memory profile runs whole prompts.
        compute_config = replace(config, scheduler=_effective_scheduler_config(config.scheduler, handoff))
        parts = model_parts(
            compute_config, encode_locally=encode_locally, mm_cache=mm_cache, clock=clock, instance=instance
        )
        num_blocks, self.model, self.runner = parts.num_blocks, parts.model, parts.runner
        self.max_model_len = _resolve_max_model_len(
            mc.max_model_len, mc.derived_max_model_len, num_blocks * cc.block_size
        )
        self.block_manager = BlockManager(num_blocks, cc.block_size, cc.enable_prefix_caching)
        chunked, budget = self._prefill_policy(handoff)
        sc = config.scheduler
        self.scheduler = Scheduler(
            self.block_manager,
            sc.max_num_seqs,
            budget,
            self._swap_out,
            chunked,
            sc.queue_policy("decode" if mm_cache is None and not encode_locally else "prefill"),  # D: decode
            clock,
            step_estimator or make_step_estimator(sc.slo_profile),
            sc.slo_tpot,
            sc.reject_late,
        )
        self.streamer = self._streamer(handoff, layer_sink)
        self.sampler = Sampler()
        self.eos_token_ids = frozenset(_eos_token_ids(Path(mc.model), mc.hf.eos_token_ids))
        self.shared_generator = torch.Generator(device=self.device).manual_seed(mc.seed)
        self.requests: dict[str, Request] = {}
        self._failed: list[tuple[Request, str]] = []  # ended before scheduling, with why (take_rejected)
        self.num_steps, self.step_seconds, self.last_batch_tokens = 0, 0.0, 0
        # Async scheduling (epd.engine.async_scheduling): decode steps launched before the last is read.
        self.async_steps = AsyncStepper(self) if config.async_scheduling else None
        # Images encoded beside the steps, before their requests are scheduled (epd.engine.encode_ahead).
        waiting = self._images_encoded_waiting
        self.ahead = _encode_ahead(config, self.runner.embedder, waiting, parts.ahead_tower)
        logger.info(
            "engine %s ready: %s on %s, %d KV blocks of %d tokens, max_model_len %d",
            instance or "",
            mc.hf.architecture,
            self.device,
            num_blocks,
            cc.block_size,
            self.max_model_len,
        )

    # ---- requests -----------------------------------------------------------------------------

    def new_request(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_fits(len(prompt.prompt_token_ids))
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return Request(
            request_id,
            prompt,
            params,
            self.runner.merge_size,
            generator,
            arrival_time=arrival_time or self.clock.now(),
        )

    def add_request(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        arrival_time: float | None = None,
        earlier_token_ids: Sequence[int] = (),
    ) -> Request:
        """Queue a request for prefill. `earlier_token_ids`: outputs it produced before (elsewhere:
        a continuation), prefilled after the prompt; its next token follows them."""
        request = self.new_request(request_id, self.prepare_images(prompt), params, arrival_time)
        self._continue_after(request, earlier_token_ids)
        request.record(Event.PREFILL_QUEUED, self.clock.now(), self.instance)
        self._enqueue(request)
        return request

    def add_handoff(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        first_token: int,
        first_logprobs: PositionLogprobs | None,
        kv: torch.Tensor,
        generator_state: torch.Tensor | None = None,
        arrival_time: float | None = None,
        earlier_token_ids: Sequence[int] = (),
    ) -> Request:
        """Continue decoding a request whose prompt (and `earlier_token_ids`, its outputs before
        `first_token`) was prefilled elsewhere (KV in `kv`)."""
        request = self.new_request(request_id, prompt, params, arrival_time)
        if request.generator is not None and generator_state is not None:
            request.generator.set_state(generator_state.cpu())  # get/set_state take CPU bytes, any device
        self._continue_after(request, earlier_token_ids)
        request.output_token_ids.append(first_token)
        if first_logprobs is not None:
            request.output_logprobs.append(first_logprobs)
        request.output_text = request.detokenizer.step(
            self.tokenizer.decode, request.output_token_ids, params.skip_special_tokens
        )
        request.kv_payload = kv
        self._enqueue(request)
        return request

    def _continue_after(self, request: Request, earlier_token_ids: Sequence[int]) -> None:
        """The request's outputs so far, produced elsewhere: they count towards its limits and
        text. Their logprobs went out with them, so their places hold None."""
        if not earlier_token_ids:
            return
        request.output_token_ids.extend(earlier_token_ids)
        if request.params.logprobs is not None:
            request.output_logprobs.extend([None] * len(earlier_token_ids))
        request.output_text = request.detokenizer.step(
            self.tokenizer.decode, request.output_token_ids, request.params.skip_special_tokens
        )

    def _enqueue(self, request: Request) -> None:
        self.requests[request.request_id] = request
        images = self._images_to_encode_ahead(request)
        if images:
            self.ahead.submit(request, images)  # to the scheduler once they are in (_admit_encoded)
        else:
            self.scheduler.add(request)

    def _images_to_encode_ahead(self, request: Request) -> list[int]:
        """The images of a new request worth encoding ahead: none without encode-ahead or with KV
        brought along; else those past what the prefix cache holds of its prompt now."""
        if self.ahead is None or not request.prompt.images or request.kv_payload is not None:
            return []
        cached = self.block_manager.cached_prefix_tokens(request.all_token_ids, request.prompt.mm_spans)
        return [i for i, ph in enumerate(request.prompt.placeholders) if ph.end > cached]

    def _admit_encoded(self) -> None:
        """Requests whose images were encoded ahead go to the scheduler; those whose encoding
        failed end with the error (reported by `take_rejected`)."""
        for job in self.ahead.take_done():
            req = job.request
            if job.error is None:
                self.scheduler.add(req)
                continue
            self.requests.pop(req.request_id, None)
            req.status, req.finish_reason = RequestStatus.FINISHED, "error"
            req.record(Event.FINISHED, self.clock.now(), self.instance)
            self._failed.append((req, job.error))

    def check_fits(self, num_prompt_tokens: int) -> None:
        """Raise ValueError for a prompt this engine could never serve."""
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt has {num_prompt_tokens} tokens; the maximum is {self.max_model_len - 1} "
                f"(max_model_len {self.max_model_len} leaves room for one generated token)"
            )
        if self.block_manager.blocks_needed(num_prompt_tokens + 1) > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt of {num_prompt_tokens} tokens needs more KV blocks than the whole cache "
                f"holds ({self.block_manager.num_blocks} x {self.block_manager.block_size})"
            )

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if self.ahead is not None:
            self.ahead.cancel(request_id)
        if request is not None and not request.is_finished:
            request.finish_reason = "abort"
            self.scheduler.finish(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or (self.ahead is not None and self.ahead.pending > 0)

    def rewire(self, handoff: HandOff | None, layer_sink: LayerSink | None, mm_cache: MMCache | None) -> None:
        """Point an idle engine at new neighbours (a role switch), keeping weights and caches: what
        happens after the first token (`handoff`, `layer_sink`, as in the constructor) and where
        embeddings come from (`mm_cache`; a vision tower in this process stays the source)."""
        if self.has_unfinished_requests():
            raise RuntimeError("an engine can be rewired only while it holds no request")
        self.handoff = handoff
        # Hand-offs start or stop: so does chunking. (An engine whose memory was profiled with
        # chunked steps and now prefills whole prompts may need more activation memory.)
        self.scheduler.set_prefill_policy(*self._prefill_policy(handoff))
        self.streamer = self._streamer(handoff, layer_sink)
        if isinstance(self.runner.embedder, (CachedEmbeddings, NoEmbeddings)):
            self.runner.embedder = choose_embedder(None, mm_cache, self.device, self.clock, self.instance)

    def _prefill_policy(self, handoff: HandOff | None) -> tuple[bool, int]:
        """(chunked prefill, tokens per step) of this engine with or without hand-offs."""
        policy = _effective_scheduler_config(self.config.scheduler, handoff)
        budget = policy.budget(self.max_model_len)
        if (policy.max_num_batched_tokens or budget) < budget:
            logger.info("max_num_batched_tokens raised to max_model_len %d: prompts go whole", budget)
        return policy.enable_chunked_prefill, budget

    def _streamer(
        self, handoff: HandOff | None, layer_sink: LayerSink | None
    ) -> LayerStreamer | NoLayerStreaming:
        """Layer-wise KV streaming needs both a sink and a hand-off to end the request with."""
        if layer_sink is not None and handoff is not None:
            return LayerStreamer(self.runner, layer_sink)
        return NoLayerStreaming()

    # ---- as an entry point's backend (epd.entrypoints.backend): one instance, in this process ----

    @property
    def instance_name(self) -> str:
        return self.instance or "EPD0"

    def wake(self) -> None:
        """End a step that waits for images encoded ahead (its only wait), from any thread."""
        if self.ahead is not None:
            self.ahead.wake()

    def poll_idle(self) -> list[RequestOutput]:
        return []  # nothing arrives from elsewhere

    def instance_stats(self) -> dict[str, dict[str, float]]:
        return {self.instance_name: self.stats()}

    def instances_up(self) -> dict[str, bool]:
        return {self.instance_name: True}  # it lives as long as this process

    def missing_roles(self) -> list[str]:
        return []  # it holds every role, as long as this process lives

    def prepare_images(self, prompt: ProcessedPrompt) -> ProcessedPrompt:
        """The prompt with its images' patches made from their files, the images in parallel on
        threads of the engine's `PatchPool`: what this in-process engine encodes from. Call it
        before `add_request`, off the thread that steps the engine (the server does, in its
        preprocessing threads); `add_request` does it itself for a prompt that skipped it."""
        if all(img.pixel_values is not None for img in prompt.images):
            return prompt
        if self._patch_pool is None:
            self._patch_pool = PatchPool()
            self._image_config = ImageProcessorConfig.from_pretrained(self.config.model.model)
        return self._patch_pool.prepare(prompt, self._image_config)

    def shutdown(self) -> None:
        # No process of its own: its memory goes with the last reference; its threads stop.
        if self._patch_pool is not None:
            self._patch_pool.close()
        if self.ahead is not None:
            self.ahead.close()

    def stats(self) -> dict[str, float]:
        """Scheduler and cache figures now (see epd.cluster.stats.STAT_HELP)."""
        blocks = self.block_manager
        return {
            # Those whose images are being encoded ahead wait too: for the router, queued work.
            "waiting_requests": len(self.scheduler.waiting) + (self.ahead.pending if self.ahead else 0),
            "running_requests": len(self.scheduler.running),
            "last_batch_tokens": self.last_batch_tokens,
            "kv_cache_usage": blocks.usage,
            "kv_cache_blocks": blocks.num_blocks,
            "prefix_cache_hit_tokens_total": blocks.prefix_hit_tokens,
            "prefix_cache_query_tokens_total": blocks.prefix_query_tokens,
            "steps_total": self.num_steps,
            "step_seconds_total": self.step_seconds,
            "preemptions_total": self.scheduler.num_preemptions,
            "late_requests_total": self.scheduler.num_late,
            "rejected_late_total": self.scheduler.num_rejected,
        } | self._async_stats()

    def _async_stats(self) -> dict[str, float]:
        if self.async_steps is None:
            return {}
        return {"overlapped_steps_total": self.async_steps.num_overlapped_steps}

    # ---- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward pass over everything schedulable; outputs of the requests it advanced."""
        advanced = self.step_requests()
        for req in advanced:
            refresh_text(req, self.tokenizer.decode)  # step_requests leaves the text to its readers
        return [request_output(r) for r in advanced] + self.take_rejected()

    def take_rejected(self) -> list[RequestOutput]:
        """The requests the scheduler refused since the last call (--reject-late: they cannot meet
        their TTFT deadline), as finished outputs with an error and a retry-after."""
        outputs = []
        for req, error in self._failed:
            out = request_output(req)
            out.error = error
            outputs.append(out)
        self._failed.clear()
        for req, retry_after in self.scheduler.rejected:
            self.requests.pop(req.request_id, None)
            req.finish_reason = "error"  # finished_time: when the scheduler refused it
            req.record(Event.FINISHED, req.metrics.finished_time or self.clock.now(), self.instance)
            out = request_output(req)
            out.error = "it cannot meet its TTFT deadline (slo_ttft) even if served next"
            out.retry_after = retry_after
            outputs.append(out)
        self.scheduler.rejected.clear()
        return outputs

    def step_requests(self) -> list[Request]:
        """Like `step`, returning the advanced requests themselves (for instance loops).

        Their `output_text` is final once they finish; before that it is brought up to date
        only where stop strings need it (`epd.engine.stop.refresh_text` does it on demand).
        """
        if self.ahead is not None and self._wait_for_encoded():
            return []
        if self.async_steps is not None:
            return self.async_steps.step()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        return self._run_step(batch)

    def _images_encoded_waiting(self) -> int:
        """Images encoded ahead of requests the scheduler has not started (encode-ahead's bound):
        before its prefill starts, only encode-ahead fills a request's embeddings."""
        waiting = (r for r in self.scheduler.waiting if r.metrics.first_scheduled_time is None)
        return sum(e is not None for r in waiting for e in r.image_embeds)

    def _wait_for_encoded(self) -> bool:
        """Admit what was encoded ahead; with nothing else to run, wait a little for more (True:
        this step has nothing to run). The wait ends early on `wake`, so new work is not held up."""
        self._admit_encoded()
        if self.scheduler.has_unfinished() or not self.ahead.pending:
            return False
        self.ahead.wait(ENCODED_WAIT_S)
        self._admit_encoded()
        return not self.scheduler.has_unfinished()

    def _run_step(self, batch: ScheduledBatch) -> list[Request]:
        """A scheduled step, synchronously: forward, sample, postprocess."""
        started = self.clock.monotonic()
        tables = [self.block_manager.block_table(r.request_id) for r in batch.requests]
        self._mark_started(batch)
        for req, start in batch.injections:
            self.runner.inject_kv(self.block_manager.block_table(req.request_id), start, req.kv_payload)
            req.kv_payload = None
        logits = self.runner.run(batch, tables, self.streamer.plan(batch, tables))
        self._advance_computed(batch)  # needs no sampled token: runs while the device works
        advanced = self._sample(batch, logits)
        self._count_step(batch, self.clock.monotonic() - started)
        return advanced

    def _count_step(self, batch: ScheduledBatch, seconds: float) -> None:
        self.num_steps += 1
        self.step_seconds += seconds
        if self.scheduler.estimator is not None:
            self.scheduler.estimator.observe_counts(batch.total_tokens, len(batch), seconds)
        self.last_batch_tokens = batch.total_tokens

    def _mark_started(self, batch: ScheduledBatch) -> None:
        now = self.clock.now()
        injected = {id(req) for req, _ in batch.injections}
        for req in batch.requests:
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                started = Event.DECODE_START if id(req) in injected else Event.PREFILL_START
                req.record(started, now, self.instance)

    def _advance_computed(self, batch: ScheduledBatch) -> None:
        """Count the step's tokens as computed and register the blocks they filled for prefix reuse.

        `commit` is called only where a step crosses a block boundary or follows injected KV:
        elsewhere it would register nothing (a request's full blocks were committed at the step
        that filled them, or came from the prefix cache already committed), and its arguments
        (the whole token list) cost O(context) per request per step.
        """
        size = self.block_manager.block_size
        injected = {id(req) for req, _ in batch.injections}
        for req, n in zip(batch.requests, batch.num_new_tokens):
            before = req.num_computed_tokens
            req.num_computed_tokens += n
            if req.num_computed_tokens // size > before // size or id(req) in injected:
                self.block_manager.commit(
                    req.request_id, req.all_token_ids, req.prompt.mm_spans, req.num_computed_tokens
                )

    def _sample(self, batch: ScheduledBatch, logits: torch.Tensor) -> list[Request]:
        """Next tokens of the requests whose tokens this step completed (not of a prompt's earlier
        chunks: their logits are not a next token, and sampling them would draw from generators)."""
        rows = [i for i, samples in enumerate(batch.samples) if samples]
        if not rows:
            return []
        if len(rows) < len(batch):
            logits = logits[torch.tensor(rows, device=logits.device)]
        requests = [batch.requests[i] for i in rows]
        sampled = self.sampler(
            logits,
            [r.params for r in requests],
            [r.generator or self.shared_generator for r in requests],
        )
        return self._postprocess(requests, sampled.token_ids, sampled.logprobs)

    def _postprocess(self, requests: list[Request], tokens: list[int], logprobs: list) -> list[Request]:
        advanced = []
        for req, token, lp in zip(requests, tokens, logprobs):
            req.output_token_ids.append(token)
            if lp is not None:
                req.output_logprobs.append(self._with_text(lp))
            first = self._first_sampled_here(req)
            if first:
                self._record_first_token(req)
            update_text_and_check_stop(req, self.tokenizer.decode, self.eos_token_ids, self.max_model_len)
            if req.finish_reason is not None:
                req.metrics.finished_time = self.clock.now()
                req.record(Event.FINISHED, req.metrics.finished_time, self.instance)
                self._forget(req)
                self.streamer.finished(req)
            elif self.handoff is not None and first:
                self._hand_off(req)
            advanced.append(req)
        return advanced

    def _first_sampled_here(self, req: Request) -> bool:
        """Whether the token just sampled is the first this engine sampled after prefilling `req`:
        its first output, or, for a continuation, the one after its earlier tokens. A request handed
        off here (its KV computed elsewhere, where that token was sampled) has none."""
        if req.metrics.first_token_time is not None:
            return False
        return any(e.event is Event.PREFILL_START for e in req.metrics.events)

    def _record_first_token(self, req: Request) -> None:
        now = req.metrics.first_token_time = self.clock.now()
        req.record(Event.PREFILL_END, now, self.instance)
        if self.handoff is None:
            req.record(Event.DECODE_START, now, self.instance)  # decodes right here, no transfer

    def _hand_off(self, req: Request) -> None:
        kv = None
        if not self.streamer.pop_streamed(req):
            table = self.block_manager.block_table(req.request_id)
            kv = self.runner.handoff_kv(table, req.num_computed_tokens)
        req.record(Event.KV_TRANSFER_START, self.clock.now(), self.instance)
        self.handoff(req, kv)
        self._forget(req)

    def _forget(self, req: Request) -> None:
        self.scheduler.finish(req)
        self.requests.pop(req.request_id, None)

    def _swap_out(self, req: Request) -> bool:
        if self.runner.embedder.can_recompute(req) or req.num_computed_tokens == 0:
            return False
        table = self.block_manager.block_table(req.request_id)
        req.kv_payload = self.runner.gather_kv(table, req.num_computed_tokens).cpu()
        return True

    def _with_text(self, position: dict[int, Logprob]) -> dict[int, Logprob]:
        for token_id, lp in position.items():
            lp.decoded_token = self.tokenizer.decode([token_id], False)
        return position


def _encode_ahead(
    config: EngineConfig,
    embedder: ImageEmbedder,
    images_waiting: Callable[[], int],
    tower: AheadTower | None = None,
) -> EncodeAhead | None:
    """Encode-ahead, if this engine holds the tower and it is asked for (by default: on CUDA);
    `tower`: what encodes (None: a thread of the engine's, epd.engine.encode_ahead.TowerThread)."""
    if not isinstance(embedder, LocalEncoder) or not config.encodes_ahead(embedder.device):
        return None
    if tower is not None:
        return EncodeAhead(embedder, images_waiting, tower=tower)
    graphs = None
    if config.vision_cuda_graphs:  # its input buffer alone is ~150 MB of device memory
        graphs = VisionGraphs.for_model(embedder.model, MAX_GRAPH_PATCHES, embedder.device)
    return EncodeAhead(embedder, images_waiting, tower_graphs=graphs)


def request_output(req: Request) -> RequestOutput:
    completion = CompletionOutput(
        index=0,
        text=req.output_text,
        token_ids=list(req.output_token_ids),
        logprobs=list(req.output_logprobs) if req.params.logprobs is not None else None,
        finish_reason=req.finish_reason,
        stop_reason=req.stop_reason,
    )
    return RequestOutput(
        request_id=req.request_id,
        prompt=req.prompt.prompt,
        prompt_token_ids=req.prompt_token_ids,
        outputs=[completion],
        finished=req.finish_reason is not None,
        metrics=req.metrics,
        num_cached_tokens=req.num_cached_tokens,
    )


def _effective_scheduler_config(config: SchedulerConfig, handoff: HandOff | None) -> SchedulerConfig:
    """The scheduler config an engine runs with: chunked prefill only where it decodes (a hand-off
    takes the KV of a whole prompt's prefill: see the module docstring)."""
    if handoff is None:
        return config
    return replace(config, enable_chunked_prefill=False)


def _resolve_max_model_len(explicit: int | None, derived: int, cache_tokens: int) -> int:
    """A request must fit the cache alone, or preemption could never let it finish."""
    if explicit is not None and explicit > cache_tokens:
        raise ValueError(
            f"max_model_len {explicit} exceeds the KV cache ({cache_tokens} tokens); "
            "lower max_model_len or give the cache more blocks"
        )
    if derived > cache_tokens:
        logger.info("max_model_len lowered from %d to the KV cache size %d", derived, cache_tokens)
    return min(derived, cache_tokens)


def _eos_token_ids(model_dir: Path, from_config: tuple[int, ...]) -> set[int]:
    """EOS ids from generation_config.json (what HF generate stops on), else config.json."""
    path = model_dir / "generation_config.json"
    if path.exists():
        eos = json.loads(path.read_text()).get("eos_token_id")
        if eos is not None:
            return set(eos) if isinstance(eos, list) else {int(eos)}
    return set(from_config)

"""One aggregated engine instance: `schedule() -> run() -> postprocess()` per step."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from epd.config import EngineConfig
from epd.engine.block_manager import BlockManager
from epd.engine.kv_cache import num_blocks_for_memory
from epd.engine.model_runner import ModelRunner
from epd.engine.request import Request
from epd.engine.sampler import Sampler
from epd.engine.scheduler import ScheduledBatch, Scheduler
from epd.engine.stop import update_text_and_check_stop
from epd.inputs.tokenizer import Tokenizer
from epd.inputs.types import ProcessedPrompt
from epd.models.loader import build_model
from epd.outputs import CompletionOutput, Logprob, RequestOutput
from epd.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        mc, cc = config.model, config.cache
        self.device = torch.device(config.device)
        model = build_model(
            mc.model, dtype=mc.torch_dtype, device=self.device, load_format=mc.load_format, seed=mc.seed
        )
        num_blocks = cc.num_kv_blocks or num_blocks_for_memory(
            mc.hf.text, cc.block_size, mc.torch_dtype, cc.kv_cache_memory_bytes
        )
        self.max_model_len = _resolve_max_model_len(
            mc.max_model_len, mc.derived_max_model_len, num_blocks * cc.block_size
        )
        max_batched = config.scheduler.max_num_batched_tokens or self.max_model_len
        if max_batched < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({max_batched}) must be >= max_model_len "
                f"({self.max_model_len}): prompts are prefilled in one step"
            )
        self.block_manager = BlockManager(num_blocks, cc.block_size, cc.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.scheduler.max_num_seqs, max_batched)
        self.runner = ModelRunner(
            model, num_blocks, cc.block_size, self.device, mc.torch_dtype, config.attention_backend
        )
        self.sampler = Sampler()
        self.eos_token_ids = frozenset(_eos_token_ids(Path(mc.model), mc.hf.eos_token_ids))
        self.shared_generator = torch.Generator(device=self.device).manual_seed(mc.seed)
        self.requests: dict[str, Request] = {}
        logger.info(
            "engine ready: %s on %s, %d KV blocks of %d tokens, max_model_len %d",
            mc.hf.architecture,
            self.device,
            num_blocks,
            cc.block_size,
            self.max_model_len,
        )

    # ---- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._check_fits(len(prompt.prompt_token_ids))
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        request = Request(
            request_id,
            prompt,
            params,
            self.runner.merge_size,
            generator,
            arrival_time=arrival_time or time.time(),
        )
        self.requests[request_id] = request
        self.scheduler.add(request)

    def _check_fits(self, num_prompt_tokens: int) -> None:
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
        if request is not None and not request.is_finished:
            request.finish_reason = "abort"
            self.scheduler.finish(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward pass over everything schedulable; outputs of the requests it advanced."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        now = time.time()
        for req in batch.requests:
            req.metrics.first_scheduled_time = req.metrics.first_scheduled_time or now
        tables = [self.block_manager.block_table(r.request_id) for r in batch.requests]
        logits = self.runner.run(batch, tables)
        sampled = self.sampler(
            logits,
            [r.params for r in batch.requests],
            [r.generator or self.shared_generator for r in batch.requests],
        )
        return self._postprocess(batch, sampled.token_ids, sampled.logprobs)

    def _postprocess(self, batch: ScheduledBatch, tokens: list[int], logprobs: list) -> list[RequestOutput]:
        outputs, now = [], time.time()
        for req, n, token, lp in zip(batch.requests, batch.num_new_tokens, tokens, logprobs):
            req.num_computed_tokens += n
            self.block_manager.commit(
                req.request_id, req.all_token_ids, req.prompt.mm_spans, req.num_computed_tokens
            )
            req.output_token_ids.append(token)
            if lp is not None:
                req.output_logprobs.append(self._with_text(lp))
            req.metrics.first_token_time = req.metrics.first_token_time or now
            update_text_and_check_stop(req, self.tokenizer.decode, self.eos_token_ids, self.max_model_len)
            if req.finish_reason is not None:
                req.metrics.finished_time = now
                self.scheduler.finish(req)
                del self.requests[req.request_id]
            outputs.append(_request_output(req))
        return outputs

    def _with_text(self, position: dict[int, Logprob]) -> dict[int, Logprob]:
        for token_id, lp in position.items():
            lp.decoded_token = self.tokenizer.decode([token_id], False)
        return position


def _request_output(req: Request) -> RequestOutput:
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

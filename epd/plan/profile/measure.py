"""Timing the model on one device as the engine runs it: steps of the real runner, vision batches
of the real tower.

What is timed is what an instance waits for:
- a step: `ModelRunner.run` (inputs built, copied, forward, logits) and the greedy tokens read back
  to the host, as the engine's step does; on CUDA a pure decode step replays the runner's captured
  graph, as in production;
- a vision batch: `encode_images` on pixels already on the device (an encoder instance expands
  pixels on the device before it calls the tower; that work is not the tower's).
Clock: the host's perf_counter with the device synchronised before and after: a step's host work
counts, since the instance pays it. Every shape is run `warmup` times untimed (kernel compilation,
allocator growth), then timed once per round for `repeats` rounds; its median is kept
(epd.plan.profile.timing).

Requests are text: image rows cost what text rows cost in the LLM. KV blocks are handed out in
order and wrap around the pool when a step needs more than it holds (the bytes read stay the same,
only their values repeat); the cache holds random values, never zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from epd.bench.roofline_setup import BlockAllocator
from epd.clock import WALL_CLOCK
from epd.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from epd.engine.factory import PartsFactory, load_model_parts
from epd.engine.kv_cache import bytes_per_block
from epd.engine.request import Request
from epd.engine.scheduler import ScheduledBatch
from epd.inputs.types import ProcessedPrompt
from epd.plan.profile.features import as_runs
from epd.plan.profile.grids import Grids, Step
from epd.plan.profile.store import Measurement
from epd.plan.profile.timing import Timing, medians_in_rounds, synchronized
from epd.sampling_params import SamplingParams

Log = Callable[[str], None]
BLOCK_SIZE = 16  # the engine's default (epd.config.CacheConfig)


@dataclass(frozen=True)
class Target:
    model: str  # checkpoint directory (config.json; weights unless load_format is "dummy")
    device: str
    dtype: str
    load_format: str
    kv_cache_bytes: int  # at most this much KV cache (less when the grids need less)


class ModelBench:
    """The model loaded once on the target device, with a KV cache and runner like an instance's.

    `parts`: how the engine builds its compute (a tensor-parallel rank 0's `instance_parts`, whose
    workers run their shares: epd.plan.profile.measure_parallel); `encode_locally`: False leaves
    the vision tower out (such a bench times steps only); `cuda_graphs`: the engine's option (None:
    wherever the device allows, at any degree)."""

    def __init__(
        self,
        target: Target,
        grids: Grids,
        parts: PartsFactory = load_model_parts,
        encode_locally: bool = True,
        cuda_graphs: bool | None = None,
    ) -> None:
        self.device = torch.device(target.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # Triton kernels and synchronize() act on the current one
        model_config = ModelConfig(target.model, dtype=target.dtype, load_format=target.load_format)
        self.max_len = model_config.derived_max_model_len
        self.steps = {
            "decode": grids.decode_steps(self.max_len),
            "prefill": grids.prefill_steps(self.max_len),
        }
        config = EngineConfig(
            model_config,
            CacheConfig(block_size=BLOCK_SIZE, num_kv_blocks=self._num_blocks(model_config, target)),
            # The engine's default limit, or more: CUDA graphs of every size it would capture.
            SchedulerConfig(max_num_seqs=max(SchedulerConfig().max_num_seqs, *grids.decode_batches)),
            device=target.device,
            cuda_graphs=cuda_graphs,
        )
        built = parts(config, encode_locally=encode_locally, mm_cache=None, clock=WALL_CLOCK, instance=None)
        self.runner, self.model, self.num_blocks = built.runner, built.model, built.num_blocks
        self.runner.kv_cache.normal_()  # never time on zeros (a tensor-parallel rank 0: its share)
        self.grids = grids
        # Every request's tokens are a prefix of these: random, drawn once.
        vocab = min(model_config.hf.text.vocab_size, 1000)
        generator = torch.Generator().manual_seed(0)
        self.token_ids = torch.randint(0, vocab, (self._longest_sequence(),), generator=generator).tolist()

    def _num_blocks(self, config: ModelConfig, target: Target) -> int:
        """Enough blocks for the largest step of the grids, within the memory given; never fewer
        than the longest single sequence needs (a block table may not wrap onto itself)."""
        steps = self.steps["decode"] + self.steps["prefill"]
        tokens = max((sum(new + ctx for new, ctx in step) for step in steps), default=1)
        budget = target.kv_cache_bytes // bytes_per_block(config.hf.text, BLOCK_SIZE, config.torch_dtype)
        longest = math.ceil(self._longest_sequence() / BLOCK_SIZE)
        return max(min(math.ceil(tokens / BLOCK_SIZE), budget), longest) + 1

    def _longest_sequence(self) -> int:
        steps = self.steps["decode"] + self.steps["prefill"]
        return max((new + ctx for step in steps for new, ctx in step), default=1)

    @property
    def graph_sizes(self) -> tuple[int, ...]:
        graphs = getattr(self.runner, "graphs", None)  # a tensor-parallel runner's: rank 0's
        return tuple(graphs.sizes) if graphs is not None else ()

    @property
    def attention_backend(self) -> str:
        local = getattr(self.runner, "local", self.runner)  # rank 0's own runner, in parallel
        return local.backend.name

    def time_steps(self, stage: str, log: Log) -> list[Measurement]:
        """Every step of the stage's grid ("decode" or "prefill"), timed."""
        steps = self.steps[stage]
        seconds = self._medians([self._step_timing(step) for step in steps])
        for i, (step, sec) in enumerate(zip(steps, seconds)):
            log(f"[{stage}] {i + 1}/{len(steps)} {_describe(step)}: {sec * 1e3:.3f} ms")
        return [Measurement(as_runs(step), sec) for step, sec in zip(steps, seconds)]

    def time_encodes(self, log: Log) -> list[Measurement]:
        """Every vision batch of the grid, timed."""
        batches = self.grids.encode_batches(self.model.config.vision.patch_size)
        seconds = self._medians([self._encode_timing(grids) for grids in batches])
        for i, (grids, sec) in enumerate(zip(batches, seconds)):
            log(f"[encode] {i + 1}/{len(batches)} {len(grids)} x {grids[0]}: {sec * 1e3:.3f} ms")
        return [Measurement(as_runs(grids), sec) for grids, sec in zip(batches, seconds)]

    def _medians(self, timings: list[Timing]) -> list[float]:
        return medians_in_rounds(timings, self.grids.warmup, self.grids.repeats)

    def _step_timing(self, step: Step) -> Timing:
        alloc = BlockAllocator(self.num_blocks, BLOCK_SIZE)
        batch = ScheduledBatch()
        for i, (new, context) in enumerate(step):
            tokens = self.token_ids[: new + context]
            batch.add(text_request(f"s{i}", new, context, tokens, self.runner.merge_size), new)
        tables = [alloc.table(new + context) for new, context in step]
        return synchronized(partial(_engine_step, self.runner, batch, tables), self.device)

    def _encode_timing(self, grids: list[tuple[int, int, int]]) -> Timing:
        patches = sum(t * h * w for t, h, w in grids)
        dtype = self.runner.kv_cache.dtype  # the model's
        pixels = torch.randn(patches, self.model.config.vision.patch_dim, device=self.device, dtype=dtype)
        return synchronized(partial(_encode, self.model, pixels, grids), self.device)


def text_request(rid: str, new: int, context: int, token_ids: list[int], merge_size: int) -> Request:
    """A request whose next step computes `new` of its `token_ids` after `context` cached ones. One
    new token: a decode (its last token generated, as the runner's graph path requires); more: a
    prefill whose first `context` prompt tokens are cached."""
    prompt_len = context if new == 1 else context + new
    prompt = ProcessedPrompt(token_ids[:prompt_len], [], [])
    request = Request(rid, prompt, SamplingParams(temperature=0), merge_size)
    request.output_token_ids = token_ids[prompt_len : context + new]
    request.num_computed_tokens = context
    return request


def _engine_step(runner, batch: ScheduledBatch, tables: list[list[int]]) -> list[int]:
    """One step as the engine runs it: the forward, then greedy tokens read back to the host."""
    return runner.run(batch, tables).argmax(-1).tolist()


@torch.inference_mode()
def _encode(model: torch.nn.Module, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> None:
    model.encode_images(pixels, grids)


def _describe(step: Step) -> str:
    return " + ".join(f"{count} x (new {new}, ctx {ctx})" for count, new, ctx in as_runs(step))

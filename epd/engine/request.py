"""One request's state inside an engine instance.

Lifecycle (owned by the scheduler):

    WAITING --schedule--> RUNNING --finish--> FINISHED
       ^                     |
       +----- preempt -------+   (KV freed; recomputed from all tokens on re-admission)

Where a RUNNING request stands follows from its counts (chunked prefill, epd.engine.scheduler):

| num_computed_tokens              | the next step computes               | and samples a token   |
|----------------------------------|--------------------------------------|-----------------------|
| < num_tokens - 1 (partly filled) | its next chunk, as the budget allows | if that chunk ends it |
| == num_tokens - 1 (decoding)     | its last token                       | yes                   |
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from epd.engine.detokenizer import IncrementalDetokenizer
from epd.engine.sampler import draw_seed
from epd.inputs.types import ProcessedPrompt
from epd.lifetime import Event, LifetimeEvent
from epd.models.mrope import mrope_positions
from epd.outputs import PositionLogprobs, RequestMetrics
from epd.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt: ProcessedPrompt
    params: SamplingParams
    merge_size: int
    # A seeded request's own generator; read it as `generator`, which sets it for the next draw.
    seeded_generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.time)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[PositionLogprobs] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in this instance's cache
    num_cached_tokens: int = 0  # of the prompt, taken from the prefix cache at first admission
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    output_text: str = ""
    detokenizer: IncrementalDetokenizer = field(default_factory=IncrementalDetokenizer)
    # Encoder outputs per image, kept until the request finishes so a preempted request
    # recomputes without encoding again.
    image_embeds: list[torch.Tensor | None] = field(default_factory=list)
    # KV rows [layers, 2, tokens, kv_heads, head_dim] of the first tokens, computed elsewhere:
    # handed off by a prefill instance, or swapped out at preemption. Written into fresh
    # blocks at admission instead of recomputing.
    kv_payload: torch.Tensor | None = None
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        self.image_embeds = [None] * len(self.prompt.images)
        grids = [img.grid_thw for img in self.prompt.images]
        spans = [(p.offset, p.length) for p in self.prompt.placeholders]
        intervals = [img.time_interval for img in self.prompt.images]
        self.prompt_positions, self.mrope_delta = mrope_positions(
            len(self.prompt.prompt_token_ids), spans, grids, self.merge_size, intervals
        )

    def record(self, event: Event, at: float, instance: str | None = None, item: int | None = None) -> None:
        self.metrics.events.append(LifetimeEvent(event, at, instance, item))

    @property
    def generator(self) -> torch.Generator | None:
        """The seeded request's generator, set for drawing its next token; None when unseeded.

        Its state is `draw_seed(seed, tokens generated so far)` whenever it is read, whatever
        earlier draws left in it: a request that arrives with earlier tokens (a continuation, a
        hand-off) draws what it would have drawn undisturbed, with no generator state carried over.
        """
        if self.seeded_generator is not None and self.params.seed is not None:
            self.seeded_generator.manual_seed(draw_seed(self.params.seed, len(self.output_token_ids)))
        return self.seeded_generator

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.prompt.prompt_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens_to_compute(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

"""Per-request sampling knobs, with the names and defaults of vLLM's SamplingParams."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Temperatures below this count as greedy: dividing logits by a near-zero value overflows to inf
# (vLLM uses the same threshold).
SAMPLING_EPS = 1e-5
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    After construction `stop` and `stop_token_ids` are always lists. top_k of 0 or -1 means no
    top-k limit. `seed` makes a request's samples reproducible whatever else is in the batch.
    `logprobs` asks for the sampled token's logprob plus that many top alternatives (0: only the
    sampled token). Scheduling, not sampling, but carried with the request to every stage:
    `slo_ttft` (seconds from arrival to the first token; None: the server's --slo-ttft),
    `slo_tpot` (seconds per output token after the first; None: the server's --slo-tpot) and
    `priority` (lower: sooner, as vLLM's), read by the queue policy (epd.engine.queue_policy).
    Invalid values raise ValueError.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    slo_ttft: float | None = None
    slo_tpot: float | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        self._validate()

    def _validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.n > 1:
            raise ValueError("n > 1 is not supported")
        # `not x >= 0` (rather than `x < 0`) also rejects NaN.
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or at least 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        if self.slo_ttft is not None and not 0 < self.slo_ttft < math.inf:
            raise ValueError(f"slo_ttft must be a positive number of seconds, got {self.slo_ttft}")
        if self.slo_tpot is not None and not 0 < self.slo_tpot < math.inf:
            raise ValueError(f"slo_tpot must be a positive number of seconds, got {self.slo_tpot}")

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0 (below 1e-5 counts as 0) or top_k == 1."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1

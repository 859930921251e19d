"""What one benchmark run does, as frozen configs, and the parsers of the flag values behind them.

| config        | flags                                                                          |
|---------------|--------------------------------------------------------------------------------|
| WorkloadSpec  | --workload --images-per-request --image-size --image-reuse --prompt-tokens     |
|               | --output-tokens --text-only-share --dataset-path --temperature --ignore-eos    |
|               | --classes (RequestClass: a mix, each class its own images, output and SLO)     |
| ArrivalSpec   | --rate / --rates --arrival --burstiness --max-concurrency --same-arrivals      |
| SLO           | --slo-ttft --slo-tpot                                                          |
| PhaseSpec     | --phases: each phase's workload and arrivals (epd.bench.serve.phases)          |
| BenchSpec     | all of the above plus --num-requests --warmup --seed and the server to drive   |
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

WORKLOADS = ("synthetic", "shapes", "jsonl")
ARRIVALS = ("poisson", "gamma")
DEFAULT_OUTPUT_TOKENS = {"synthetic": 128, "shapes": 64, "jsonl": None}  # jsonl: each line's own


@dataclass(frozen=True)
class SizeBucket:
    """An image size and how likely it is among the workload's images."""

    width: int
    height: int
    weight: float = 1.0


@dataclass(frozen=True)
class SLO:
    ttft: float | None = None  # seconds
    tpot: float | None = None  # seconds

    @property
    def given(self) -> bool:
        return self.ttft is not None or self.tpot is not None


@dataclass(frozen=True)
class RequestClass:
    """One class of a mixed workload (--classes, epd.bench.serve.classes): its share of the
    requests, their images and output length, and the SLO its requests carry and are judged by."""

    name: str
    share: float
    images_per_request: tuple[int, int] = (1, 1)
    image_sizes: tuple[SizeBucket, ...] = (SizeBucket(512, 512),)
    output_tokens: int = 128
    slo: SLO = SLO()


@dataclass(frozen=True)
class WorkloadSpec:
    kind: str = "synthetic"
    images_per_request: tuple[int, int] = (1, 1)  # inclusive range, drawn uniformly
    image_sizes: tuple[SizeBucket, ...] = (SizeBucket(512, 512),)
    image_reuse: float = 0.0  # share of images that repeat one sent before
    prompt_tokens: int = 64
    output_tokens: int | None = 128  # None: the dataset's own max_tokens
    text_only_share: float = 0.0
    dataset_path: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = True  # synthetic only: every request then generates exactly output_tokens
    tokenizer: str | None = None  # for exact prompt lengths; None: from the model directory if local
    # A mix of classes (synthetic only): each request is of one, drawn by share; its images, output
    # length and SLO are the class's (the flags above then set only the prompt and reuse).
    classes: tuple[RequestClass, ...] = ()


@dataclass(frozen=True)
class ArrivalSpec:
    """Open loop at `rate` (Poisson, or gamma with CV `burstiness`), capped by `max_concurrency`.

    `rate=inf` sends everything at once; with `max_concurrency` that is the closed loop: each
    finished request lets the next one go.
    """

    rate: float = math.inf
    process: str = "poisson"
    burstiness: float = 1.0  # coefficient of variation of the gaps (gamma); 1 is Poisson
    max_concurrency: int | None = None
    # Set: every run sends this seed's one pattern of gaps, scaled to average exactly 1/rate
    # (--same-arrivals, epd.bench.serve.arrivals); None: each run draws its own from its seed.
    pattern_seed: int | None = None

    @property
    def label(self) -> str:
        if math.isinf(self.rate):
            return f"closed, {self.max_concurrency} at once" if self.max_concurrency else "all at once"
        return f"{self.rate:g} req/s"


@dataclass(frozen=True)
class PhaseSpec:
    """One phase of a phased run: its requests (`workload`), their arrivals, how long it lasts."""

    name: str
    workload: WorkloadSpec
    arrival: ArrivalSpec
    num_requests: int | None = None
    duration_s: float | None = None  # arrivals drawn until this many seconds (a finite rate)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.arrival.label})"


@dataclass(frozen=True)
class BenchSpec:
    base_url: str
    model: str | None = None  # None: the first model of /v1/models
    api_key: str | None = None
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    arrivals: tuple[ArrivalSpec, ...] = (ArrivalSpec(),)  # one run per entry (a rate sweep)
    slo: SLO = field(default_factory=SLO)
    num_requests: int = 100
    warmup: int = 0
    seed: int = 0
    epd_timings: str = "auto"  # auto: ask only servers whose /v1/models says owned_by "epd"
    request_timeout: float = 600.0
    progress: bool = True
    label: str | None = None  # the curve's name on comparison plots
    # Given: one run through these phases back to back (epd.bench.serve.phases), instead of one run
    # per entry of `arrivals` with `workload`.
    phases: tuple[PhaseSpec, ...] = ()


def parse_int_range(text: str) -> tuple[int, int]:
    """'2' -> (2, 2); '1-4' -> (1, 4)."""
    try:
        lo, _, hi = text.partition("-")
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not N or A-B: {text!r}") from None
    if low < 0 or high < low:
        raise argparse.ArgumentTypeError(f"need 0 <= A <= B: {text!r}")
    return low, high


def parse_sizes(text: str) -> tuple[SizeBucket, ...]:
    """'1344x1344' / '448x448,1344x1344' (equally likely) / '448x448:0.7,1344x1344:0.3' (weights)."""
    buckets = []
    for item in text.split(","):
        size, _, weight = item.strip().partition(":")
        w, x, h = size.lower().partition("x")
        try:
            bucket = SizeBucket(int(w), int(h), float(weight) if weight else 1.0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not WxH[:weight]: {item!r}") from None
        if not x or bucket.width <= 0 or bucket.height <= 0 or bucket.weight <= 0:
            raise argparse.ArgumentTypeError(f"not WxH[:weight] with positive numbers: {item!r}")
        buckets.append(bucket)
    return tuple(buckets)


def parse_rates(text: str) -> tuple[float, ...]:
    """'0.5,1,2,4' -> rates in the given order ('inf' allowed)."""
    try:
        rates = tuple(float(r) for r in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of numbers: {text!r}") from None
    if any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be > 0: {text!r}")
    return rates


def share(text: str) -> float:
    """A fraction in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"not in [0, 1]: {text!r}")
    return value

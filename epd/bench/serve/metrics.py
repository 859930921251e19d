"""Numbers of a run and of a sweep: percentiles, throughput, SLO attainment, goodput, stage means.

| figure           | definition                                                                       |
|------------------|----------------------------------------------------------------------------------|
| percentiles      | numpy's linear interpolation between order statistics (as vLLM's bench)          |
| throughput       | completed requests (or tokens) / run duration (first send to last answer)        |
| SLO attainment   | share of ALL requests with TTFT <= slo_ttft and TPOT <= slo_tpot (failures miss; |
|                  | a one-token answer has no TPOT and meets that half); a request of a --classes    |
|                  | class is judged by its class's SLO, and "classes" gives each class's figures     |
| goodput (run)    | requests meeting the SLO per second of the run (vLLM's "request goodput")        |
| goodput (sweep)  | highest offered rate with attainment >= 90%, interpolated linearly between the   |
|                  | highest passing rate and the next one (DistServe's definition)                   |
| stage means      | mean seconds per `epd_timings` stage over the requests that report them; a stage |
|                  | a request skipped counts 0, so the bars add up to the mean latency               |
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from epd.bench.serve.client import RequestResult
from epd.bench.serve.spec import SLO
from epd.lifetime import STAGES

PERCENTILES = (50, 90, 99)
ATTAINMENT_TARGET = 0.9
STAGE_ORDER = ("preprocess", *STAGES)
UNACCOUNTED = "other"  # client E2E minus the server's stages: HTTP, routing, detokenizing, waiting


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 (None for no values)."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


def slo_of(r: RequestResult, slo: SLO) -> SLO:
    """What judges `r`: its class's SLO where it has one (--classes), else the run's."""
    return SLO(
        r.slo_ttft if r.slo_ttft is not None else slo.ttft,
        r.slo_tpot if r.slo_tpot is not None else slo.tpot,
    )


def meets_slo(r: RequestResult, slo: SLO) -> bool:
    if not r.ok:
        return False
    own = slo_of(r, slo)
    if own.ttft is not None and (r.ttft is None or r.ttft > own.ttft):
        return False
    tpot = r.tpot
    return own.tpot is None or tpot is None or tpot <= own.tpot


def attainment(results: Sequence[RequestResult], slo: SLO) -> float | None:
    """Share of requests meeting their SLO; None when none has one."""
    if not results or not any(slo_of(r, slo).given for r in results):
        return None
    return sum(meets_slo(r, slo) for r in results) / len(results)


def goodput_rate(
    rates: Sequence[float], attainments: Sequence[float | None], target: float = ATTAINMENT_TARGET
) -> float | None:
    """Highest rate with attainment >= target, interpolated towards the next (failing) rate.

    0.0 when no rate passes; the highest rate when all pass (a lower bound, then); None when
    there is nothing to read it from (no finite rates, or no SLO).
    """
    points = sorted((r, a) for r, a in zip(rates, attainments) if a is not None and math.isfinite(r))
    if not points:
        return None
    passing = [i for i, (_, a) in enumerate(points) if a >= target]
    if not passing:
        return 0.0
    i = passing[-1]
    if i == len(points) - 1:
        return points[i][0]
    (r0, a0), (r1, a1) = points[i], points[i + 1]
    return r0 + (a0 - target) / (a0 - a1) * (r1 - r0)


def summarize(results: Sequence[RequestResult], duration: float, slo: SLO) -> dict:
    """The run's summary: counts, throughput, latency distributions, attainment, accuracy."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    duration = max(duration, 1e-9)
    reach = attainment(results, slo)
    scored = [r for r in results if r.expected is not None]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (prompt_tokens + out_tokens) / duration,
        "ttft": distribution([r.ttft for r in ok if r.ttft is not None]),
        "tpot": distribution([t for r in ok if (t := r.tpot) is not None]),
        "itl": distribution([gap for r in ok for gap in r.itl]),
        "e2e": distribution([r.e2e for r in ok if r.e2e is not None]),
        "slo_attainment": reach,
        "goodput": None if reach is None else sum(meets_slo(r, slo) for r in results) / duration,
        "accuracy": sum(bool(r.correct) for r in scored) / len(scored) if scored else None,
        **({"classes": by_class(results, slo)} if any(r.request_class for r in results) else {}),
    }


def by_class(results: Sequence[RequestResult], slo: SLO) -> dict[str, dict]:
    """Per class of a mixed workload: requests, completed, attainment of its own SLO, TTFT and TPOT."""
    classes: dict[str, list[RequestResult]] = {}
    for r in results:
        classes.setdefault(r.request_class or "-", []).append(r)
    return {
        name: {
            "requests": len(rs),
            "completed": sum(r.ok for r in rs),
            "slo_attainment": attainment(rs, slo),
            "ttft": distribution([r.ttft for r in rs if r.ok and r.ttft is not None]),
            "tpot": distribution([t for r in rs if r.ok and (t := r.tpot) is not None]),
        }
        for name, rs in sorted(classes.items())
    }


def stage_means(results: Sequence[RequestResult]) -> dict[str, float] | None:
    """Mean seconds per server stage (and the unaccounted rest of the client's E2E); None without any."""
    timed = [r for r in results if r.ok and r.epd_timings]
    if not timed:
        return None
    per_request = [_stages_of(r) for r in timed]
    names = [s for s in STAGE_ORDER if any(s in p for p in per_request)]
    names += sorted({s for p in per_request for s in p} - set(names))
    means = {s: sum(p.get(s, 0.0) for p in per_request) / len(timed) for s in names}
    rest = [max(0.0, (r.e2e or 0.0) - sum(p.values())) for r, p in zip(timed, per_request)]
    means[UNACCOUNTED] = sum(rest) / len(timed)
    return means


def _stages_of(r: RequestResult) -> dict[str, float]:
    timings = r.epd_timings or {}
    stages = {k: float(v) for k, v in (timings.get("stages") or {}).items() if v is not None}
    if timings.get("preprocess") is not None:
        stages["preprocess"] = float(timings["preprocess"])
    return stages

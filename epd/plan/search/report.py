"""What a plan prints and saves: the ranked table, the winner's `epd serve` command, the JSON.

| column     | meaning                                                                            |
|------------|------------------------------------------------------------------------------------|
| policy     | --scheduling-policy: every stage's queue order, or per stage                       |
|            | (epd.plan.search.policies)                                                         |
| goodput    | highest rate (req/s) with >= 90% SLO attainment, as `epd bench` computes it; `*`:   |
|            | every rate simulated passed, up to the capacity estimate (epd.plan.search.rates)    |
| at         | the highest passing rate simulated: the TTFT/TPOT p90, attainment and bottleneck    |
|            | columns are that simulation's                                                      |
| busy       | the share of their instances' time each role kept busy (epd.plan.search.role_time) |
| bottleneck | the busiest role, with its share                                                   |
| estimate   | the capacity estimate (epd.plan.search.capacity) and the roles that limit it        |
| sims       | simulations this configuration took                                                |
"""

from __future__ import annotations

import dataclasses
import math

from rich.table import Table

from epd.plan.search.search import Candidate, PlanResult

FORMAT = "epd-plan/1"
STEADY_SPANS = 3  # arrivals spanning fewer request lifetimes never reach a steady state
# Falling 10% behind, the last tenth of N requests waits 0.9 N (1/capacity - 1/(1.1 capacity)), about
# N / (12 capacity), longer: a TTFT SLO's worth at N = 12 x capacity x SLO.
OVERLOAD_SEEN = 12


def plan_table(result: PlanResult, rows: int) -> Table:
    title = f"epd plan: {_headline(result)}"
    table = Table(title=title, title_justify="left")
    for name in ("#", "layout", "max seqs", "token budget", "policy", "goodput", "at", "attained"):
        table.add_column(name, justify="left" if name == "layout" else "right", no_wrap=name == "layout")
    for name in ("TTFT p90 ms", "TPOT p90 ms", "busy E/P/D %", "bottleneck", "estimate", "sims"):
        table.add_column(name, justify="right")
    for rank, c in enumerate(best_per_layout(result)[:rows], 1):
        best, knobs = c.best, c.config.knobs
        table.add_row(
            str(rank),
            c.config.layout.text,
            str(knobs.max_num_seqs),
            "-" if knobs.max_num_batched_tokens is None else str(knobs.max_num_batched_tokens),
            c.config.policy or result.settings.scheduling_policy,
            f"{c.goodput:.3f}{'*' if c.search and c.search.at_capacity else ''}",
            "-" if best is None else f"{best.rate:.3g}",
            "-" if best is None else f"{best.attainment:.0%}",
            _ms(best.ttft_p90 if best else None),
            _ms(best.tpot_p90 if best else None),
            "-" if best is None else "/".join(f"{share * 100:.0f}" for share in best.busy_shares.values()),
            "-" if best is None else best.bottleneck,
            f"{c.capacity.rate:.3g} ({c.capacity.limiting})",
            str(c.simulations),
        )
    return table


def best_per_layout(result: PlanResult) -> list[Candidate]:
    """The ranking with each layout once, at its best knobs and queue policy."""
    seen: set[str] = set()
    best = []
    for c in result.ranked:
        if c.config.layout.text not in seen:
            seen.add(c.config.layout.text)
            best.append(c)
    return best


def _headline(result: PlanResult) -> str:
    s = result.settings
    if s.rate is None:
        return f"highest goodput on {s.gpus} GPUs"
    if result.gpus is None:
        return f"no layout of up to {s.gpus} GPUs serves {s.rate:g} req/s within the SLOs"
    return f"fewest GPUs for {s.rate:g} req/s: {result.gpus}"


def summary_lines(result: PlanResult, num_requests: int, slo_ttft: float | None) -> list[str]:
    """What the table leaves out: the configurations not ranked and how the search ended."""
    skipped = [c for c in result.candidates if c.search is None]
    below = [c for c in result.candidates if c.search is not None and c.search.below is not None]
    lines = [
        f"{len(result.ranked)} configurations ranked ({len(best_per_layout(result))} layouts, the best "
        f"knobs and queue policy of each shown), {len(below)} fell short of the rate to beat (one "
        f"simulation each), {len(skipped)} skipped on their capacity estimate; "
        f"{result.simulations} simulations"
    ]
    unsimulated = [c for c in result.candidates if c.search is not None and not c.search.trials]
    if unsimulated:
        lines.append(f"{len(unsimulated)} configurations not simulated: the budget was spent")
    note = fidelity_note(result.winner, num_requests, slo_ttft) if result.winner else None
    if note is not None:
        lines.append(note)
    if result.exhausted:
        lines.append("the simulation budget (--max-simulations) ended the search: more may be better")
    return lines


def fidelity_note(c: Candidate, num_requests: int, slo_ttft: float | None) -> str | None:
    """Whether runs of `num_requests` were long enough to judge `c` at its goodput, and if not, how
    many requests would be; None when they were."""
    best = c.best
    if best is None or c.search is None:
        return None
    span = num_requests / best.rate
    reasons, needed = [], []
    if best.e2e_p50 and span < STEADY_SPANS * best.e2e_p50:
        lifetimes = f"{STEADY_SPANS} request lifetimes (E2E p50 {best.e2e_p50:.2g} s)"
        reasons.append(f"arrivals span {span:.2g} s, under {lifetimes}")
        needed.append(math.ceil(STEADY_SPANS * best.e2e_p50 * best.rate))
    if c.search.at_capacity and slo_ttft is not None:
        reasons.append("it passed every rate up to its capacity estimate")
        needed.append(math.ceil(OVERLOAD_SEEN * c.capacity.rate * slo_ttft))
    if not reasons:
        return None
    return (
        f"{c.config.layout.text}: {' and '.join(reasons)}: too short a run to see where it falls "
        f"behind; --num-requests {max(needed)} would show it"
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def candidate_record(c: Candidate, base_policy: str) -> dict:
    """`base_policy`: the plan's own --scheduling-policy, which a configuration without one of its
    own (every one but the policy trials) runs."""
    best = c.best
    return {
        "layout": c.config.layout.text,
        "gpus": c.config.gpus,
        "knobs": dataclasses.asdict(c.config.knobs),
        "scheduling_policy": c.config.policy or base_policy,
        "goodput": c.goodput,
        "below": None if c.search is None else c.search.below,
        "at_capacity": c.search is not None and c.search.at_capacity,
        "at_rate": None if best is None else best.rate,
        "attainment": None if best is None else best.attainment,
        "ttft_p90": None if best is None else best.ttft_p90,
        "tpot_p90": None if best is None else best.tpot_p90,
        "bottleneck": None if best is None else best.bottleneck,
        "busy_shares": None if best is None else best.busy_shares,
        "capacity": {"rate": _finite(c.capacity.rate), "limiting": c.capacity.limiting},
        "trials": [
            {"rate": t.rate, "attainment": t.attainment} for t in (c.search.trials if c.search else ())
        ],
    }


def plan_document(result: PlanResult, context: dict, winner: dict | None) -> dict:
    """The JSON of a plan; `context`: the workload, SLOs and costs it was made for."""
    s = result.settings
    ranked = result.ranked
    unranked = [c for c in result.candidates if all(c is not r for r in ranked)]
    return {
        "format": FORMAT,
        "mode": "goodput" if s.rate is None else "gpus",
        "gpus": result.gpus,
        "max_gpus": s.gpus,
        "rate": s.rate,
        **context,
        "search": {
            "instance_kinds": list(s.kinds),
            "layouts": [layout.text for layout in s.layouts],
            "tp_degrees": list(s.degrees),
            "knob_space": dataclasses.asdict(s.space),
            "tune_top": s.tune_top,
            "knob_trials": s.knob_trials,
            "policy_choices": list(s.policies),
            "policy_top": s.policy_top,
            "policy_trials": s.policy_trials,
            "rate_steps": s.rate_steps,
            "seed": s.seed,
            "optimiser": "seeded pattern search over the knob grids (optuna is not a dependency)",
            "simulations": result.simulations,
            "exhausted": result.exhausted,
        },
        "ranked": [candidate_record(c, s.scheduling_policy) for c in ranked],
        "unranked": [candidate_record(c, s.scheduling_policy) for c in unranked],
        "winner": winner,
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None

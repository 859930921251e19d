"""Prefill placement by slack (MostSlack, `--scheduling-policy slo`) against fewest outstanding
tokens (LeastLoaded), on the simulator: the real router and engine cores on a virtual clock.

A cost model with attention (a fitted profile's shape: step + token + attention pair terms) makes a
long prompt's prefill cost more than several short prompts of more tokens in all. P0 holds one
3000-token prompt (~0.48 s); P1 holds four 800-token ones (~0.16 s together, 3200 tokens). An urgent
800-token request with a 0.3 s TTFT: fewest tokens sends it behind the long prompt and it misses;
the shortest predicted TTFT sends it to P1, where it makes it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from epd.cluster.router.placement import LeastLoaded, MostSlack, Placement, RequestToPlace
from epd.config import EngineConfig
from epd.engine.step_estimator import CostModelEstimator, Seq
from epd.lifetime import Event
from epd.plan.profile.costs import ProfileCosts
from epd.plan.profile.features import DECODE_TERMS, ENCODE_TERMS, PREFILL_TERMS
from epd.plan.profile.fit import StageFit
from epd.sampling_params import SamplingParams
from epd.sim import ClusterSpec, SimCluster, SimRequest, SimResult, engine_config, simulate
from epd.sim.workload import _PromptShaper


def fit(terms: tuple[str, ...], *coefficients: float) -> StageFit:
    return StageFit(terms, coefficients, 0.0, 0.0, 1)


# Prefill: 1 ms a step, 10 us a token, 0.1 us an attention pair: 3000 tokens ~0.48 s, 800 ~0.041 s.
COSTS = ProfileCosts(
    prefill=fit(PREFILL_TERMS, 1e-3, 1e-5, 1e-7, 0.0),
    decode=fit(DECODE_TERMS, 1e-3, 0.0, 0.0),
    encode=fit(ENCODE_TERMS, 1e-3, 0.0, 0.0, 0.0),
)
URGENT_TTFT = 0.3


def prefill_seconds(tokens: int) -> float:
    """What `--slo-profile` gives the router (epd.engine.step_estimator.prefill_seconds_of)."""
    return CostModelEstimator(COSTS).step_seconds([Seq(tokens, 0, tokens)]) or 0.0


@pytest.fixture(scope="module")
def engine(checkpoints) -> EngineConfig:
    return engine_config(str(checkpoints["qwen2_5_vl"]))


def text_request(engine: EngineConfig, rid: str, at: float, tokens: int, **params) -> SimRequest:
    """A prompt of `tokens` tokens whose first token is its arrival in ms (requests arrive 1 ms
    apart): no two share a KV block, so no prefix cache hit shortens a prefill."""
    first = 5000 + round(at * 1000)
    prompt = _PromptShaper(engine.model).prompt([first], list(range(10, 10 + tokens - 1)), [])
    return SimRequest(rid, at, prompt, SamplingParams(temperature=0.0, max_tokens=2, **params))


@pytest.fixture(scope="module")
def requests(engine) -> list[SimRequest]:
    shorts = [text_request(engine, f"short{i}", 0.001 * (i + 1), 800) for i in range(4)]
    return [
        text_request(engine, "long", 0.0, 3000),
        *shorts,
        text_request(engine, "urgent", 0.005, 800, slo_ttft=URGENT_TTFT),
    ]


def run(engine: EngineConfig, requests: list[SimRequest], policy: str, placement: Placement | None = None):
    config = replace(engine, scheduler=replace(engine.scheduler, scheduling_policy=policy))
    cluster = SimCluster(ClusterSpec("1E+2P+1D", config, costs=COSTS))
    cluster.router.prefill_seconds = prefill_seconds
    if placement is not None:
        cluster.router.placement = placement
    result = simulate(cluster, requests)
    assert len(result.outputs) == len(requests) and result.leftovers == []
    return cluster, result


def ttft(result: SimResult, rid: str) -> float:
    metrics = result.outputs[rid].metrics
    return metrics.first_token_time - metrics.arrival_time


def prefilled_on(result: SimResult, rid: str) -> str | None:
    events = result.outputs[rid].metrics.events
    return next(e.instance for e in events if e.event is Event.PREFILL_START)


def test_slo_places_the_prefill_where_the_deadline_is_met(engine, requests):
    cluster, by_slack = run(engine, requests, "slo")
    assert isinstance(cluster.router.placement.prefill, MostSlack), "chosen from the policy name"
    assert prefilled_on(by_slack, "long") == "P0"
    assert {prefilled_on(by_slack, f"short{i}") for i in range(4)} == {"P1"}
    assert prefilled_on(by_slack, "urgent") == "P1"
    assert ttft(by_slack, "urgent") <= URGENT_TTFT

    _, by_tokens = run(engine, requests, "slo", Placement())  # same queues, fewest tokens
    assert prefilled_on(by_tokens, "urgent") == "P0"  # 3000 tokens held there, 3200 on P1
    assert ttft(by_tokens, "urgent") > URGENT_TTFT
    assert ttft(by_slack, "long") == pytest.approx(ttft(by_tokens, "long")), "nobody pays for it"

    fcfs_cluster, fcfs = run(engine, requests, "fcfs")
    assert isinstance(fcfs_cluster.router.placement.prefill, LeastLoaded), "fcfs places as before"
    assert ttft(fcfs, "urgent") > URGENT_TTFT


def test_under_linear_prices_slack_and_fewest_tokens_agree():
    """The router's default cost model prices tokens alike: the two rules then choose alike."""
    from epd.cluster.layout import Layout, Role
    from epd.cluster.router.core import default_prefill_seconds
    from epd.cluster.router.ledger import LoadLedger, Work

    specs = Layout.parse("1E+3P+1D").instances("cpu")
    ledger = LoadLedger()
    for i, (instance, tokens) in enumerate([("P0", 3000), ("P1", 800), ("P1", 800), ("P2", 2000)]):
        ledger.reserve(Work(f"r{i}", Role.PREFILL), instance, tokens)
    request = RequestToPlace(100, default_prefill_seconds)
    by_slack = MostSlack().choose(specs, ledger, {}, request)
    assert by_slack.name == LeastLoaded(Role.PREFILL).choose(specs, ledger, {}).name == "P1"
    assert MostSlack().choose(specs, ledger, {}).name == "P1", "without the request: fewest tokens"

"""A simulated run in `epd bench`'s results format: what its client would have measured.

The client is the router's side of the harness, on virtual time, from when a request was sent:

| figure        | simulated as                                                                       |
|---------------|------------------------------------------------------------------------------------|
| TTFT          | the router has the request's first token (`metrics.first_token_time`)              |
| ITL           | gaps between the router's successive batches of the request's tokens (a streamed   |
|               | chunk each, as the server sends them: the harness's `token_times`)                 |
| E2E           | the request finished at the router (`metrics.finished_time`)                       |
| TPOT          | the benchmark's own: (E2E - TTFT) / (output tokens - 1)                            |
| epd_timings   | the lifetime events' stage breakdown, as the server reports it; preprocess 0       |
| duration      | first send (0) to the last request's end                                           |
HTTP, input processing and detokenizing are not simulated: no time passes for them. Answers are
not scored (the scripted model's text means nothing), so `expected` is left out.
"""

from __future__ import annotations

from epd.bench.serve.client import RequestResult, own_slo
from epd.outputs import RequestOutput
from epd.sim.bench_requests import BenchRun, request_id
from epd.sim.harness import SimResult

UNFINISHED = "the simulation ended before the request did"


def request_results(run: BenchRun, result: SimResult) -> list[RequestResult]:
    """One result per drawn request, in workload order."""
    results = []
    for i, drawn in enumerate(run.drawn):
        r = RequestResult(i, run.offsets[i], num_images=drawn.num_images)
        r.prompt_text_tokens = drawn.prompt_text_tokens
        own_slo(r, drawn)
        rid = request_id(i)
        r.sent_s = result.sent_at.get(rid, run.offsets[i])
        if i in run.refused:
            r.error = run.refused[i]
        elif rid not in result.outputs:
            r.error = UNFINISHED
        else:
            _finished(r, result.outputs[rid], result.token_times.get(rid, []), r.sent_s)
        results.append(r)
    return results


def _finished(
    r: RequestResult, out: RequestOutput, token_times: list[tuple[float, int]], sent: float
) -> None:
    """`sent`: when the client sent it; the router saw it after the front end's work (`preprocess`)."""
    if out.error is not None:
        r.error = out.error
        return
    metrics = out.metrics
    r.ok = True
    r.e2e = metrics.finished_time - sent
    r.ttft = r.e2e if metrics.first_token_time is None else metrics.first_token_time - sent
    r.itl = [later - earlier for (earlier, _), (later, _) in zip(token_times, token_times[1:])]
    r.output_tokens = len(out.outputs[0].token_ids)
    r.prompt_tokens = len(out.prompt_token_ids)
    preprocess = metrics.arrival_time - sent
    r.epd_timings = {"ttft": r.ttft, "e2e": r.e2e, "preprocess": preprocess, "stages": metrics.breakdown()}


def run_duration(run: BenchRun, result: SimResult) -> float:
    """First send to the last request's end (or its last send, when nothing finished)."""
    ends = [out.metrics.finished_time for out in result.outputs.values()]
    return max([*ends, *run.offsets], default=0.0)

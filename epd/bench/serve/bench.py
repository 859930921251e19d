"""`epd bench`: probe the server, warm it up, run each rate, then write JSON, plots and a table.

GET /v1/models -> model name, tokenizer directory, whether to ask for epd_timings
warm-up requests (one at a time, not recorded)
for each rate: build the workload (own namespace) -> serialise -> run -> summarise
    (or, with --phases: every phase's workload on one timeline -> one run -> a summary per phase)
results.json, PNG plots, the summary table
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from epd.bench.serve.client import RequestResult, prepare
from epd.bench.serve.phases import phase_offsets, phase_records
from epd.bench.serve.plots import write_plots
from epd.bench.serve.report import print_report
from epd.bench.serve.results import document, run_record, save
from epd.bench.serve.runner import run_requests, run_schedule
from epd.bench.serve.spec import ArrivalSpec, BenchSpec
from epd.bench.serve.workload import BenchRequest, build_requests, derive_seed

logger = logging.getLogger("epd.bench")
CHAT_PATH = "/v1/chat/completions"


class BenchError(Exception):
    """The benchmark cannot run (server unreachable, bad workload); the message says why."""


def run_benchmark(spec: BenchSpec, out_dir: Path, console: Console) -> dict:
    """Run every rate of `spec` against its server; write the results under `out_dir`; return them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    server = probe_server(spec)
    tokenizer_dir = _tokenizer_dir(spec, server)
    send = _Sender(spec, server)
    if spec.warmup:
        workload = spec.phases[0].workload if spec.phases else spec.workload
        warm = build_requests(workload, spec.warmup, spec.seed, "warmup", tokenizer_dir)
        console.print(f"warming up with {spec.warmup} request(s)")
        send.run(warm, ArrivalSpec(max_concurrency=1), 0)
    runs, overall = [], None
    with _progress(console, spec.progress) as progress:
        if spec.phases:
            runs, overall = _run_phases(spec, send, tokenizer_dir, progress, console)
        for i, arrival in enumerate(() if spec.phases else spec.arrivals):
            requests = build_requests(spec.workload, spec.num_requests, spec.seed, f"run{i}", tokenizer_dir)
            task = progress.add_task(arrival.label, total=len(requests))
            results, duration = send.run(requests, arrival, i, lambda _r, t=task: progress.advance(t))
            _warn_failures(results, console)
            runs.append(run_record(arrival, results, duration, spec.slo))
    doc = document(spec, server, runs)
    if overall is not None:
        doc["overall"] = overall
        doc["sweep"]["goodput_rate"] = None  # the phases are one run, not a sweep of rates
    files = [save(doc, out_dir), *write_plots([doc], out_dir)]
    print_report(doc, files, console)
    return doc


def _run_phases(
    spec: BenchSpec, send: _Sender, tokenizer_dir: str | None, progress: Progress, console: Console
) -> tuple[list[dict], dict]:
    """Every phase's requests on one timeline, each phase starting where the last one's arrivals end."""
    requests: list[BenchRequest] = []
    offsets: list[float] = []
    groups: list[int] = []
    starts, counts, start = [], [], 0.0
    for k, phase in enumerate(spec.phases):
        times, length = phase_offsets(phase, derive_seed(spec.seed, "arrivals", "phase", k))
        requests += build_requests(phase.workload, len(times), spec.seed, f"phase{k}", tokenizer_dir)
        offsets += [start + t for t in times]
        groups += [k] * len(times)
        starts.append(start)
        counts.append(len(times))
        start += length
    names = " -> ".join(p.name for p in spec.phases)
    task = progress.add_task(names, total=len(requests))
    limits = [p.arrival.max_concurrency for p in spec.phases]

    def advance(_result: RequestResult) -> None:
        progress.advance(task)

    results, duration = send.run_schedule(requests, offsets, groups, limits, advance)
    _warn_failures(results, console)
    return phase_records(spec.phases, starts, results, counts, duration, spec.slo)


class _Sender:
    """Serialises requests for the server's model and runs them on a fresh event loop."""

    def __init__(self, spec: BenchSpec, server: dict) -> None:
        self.spec, self.server = spec, server
        self.url = server["base_url"] + CHAT_PATH
        self.headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}

    def run(
        self,
        requests: list[BenchRequest],
        arrival: ArrivalSpec,
        index: int,
        on_done: Callable[[RequestResult], None] = lambda r: None,
    ) -> tuple[list[RequestResult], float]:
        prepared = prepare(requests, self.server["model"], self.server["epd_timings"])
        seed = derive_seed(self.spec.seed, "arrivals", index)
        return asyncio.run(
            run_requests(prepared, arrival, seed, self.url, self.headers, self.spec.request_timeout, on_done)
        )

    def run_schedule(
        self,
        requests: list[BenchRequest],
        offsets: list[float],
        groups: list[int],
        limits: list[int | None],
        on_done: Callable[[RequestResult], None],
    ) -> tuple[list[RequestResult], float]:
        prepared = prepare(requests, self.server["model"], self.server["epd_timings"])
        timeout = self.spec.request_timeout
        return asyncio.run(
            run_schedule(prepared, offsets, groups, limits, self.url, self.headers, timeout, on_done)
        )


def normalize_base_url(url: str) -> str:
    """'http://h:8000/v1/' -> 'http://h:8000' (both spellings are common)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def probe_server(spec: BenchSpec) -> dict:
    """The server's /v1/models answer, the model to ask for and whether to request epd_timings."""
    base = normalize_base_url(spec.base_url)
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    try:
        resp = httpx.get(base + "/v1/models", headers=headers, timeout=30)
        resp.raise_for_status()
        models = resp.json()
    except (httpx.HTTPError, ValueError) as e:
        raise BenchError(f"cannot read {base}/v1/models: {e}") from None
    data = models.get("data") or []
    model = spec.model or (data[0]["id"] if data else None)
    if model is None:
        raise BenchError(f"{base}/v1/models lists no model; pass --model")
    entry = next((m for m in data if m.get("id") == model), {})
    is_epd = entry.get("owned_by") == "epd"
    timings = spec.epd_timings == "on" or (spec.epd_timings == "auto" and is_epd)
    return {"base_url": base, "model": model, "models": models, "epd_timings": timings}


def _tokenizer_dir(spec: BenchSpec, server: dict) -> str | None:
    """The first local directory with a tokenizer.json: --tokenizer, --model, the model's root."""
    entry = next((m for m in server["models"].get("data") or [] if m.get("id") == server["model"]), {})
    for candidate in (spec.workload.tokenizer, spec.model, server["model"], entry.get("root")):
        if candidate and (Path(candidate) / "tokenizer.json").is_file():
            return candidate
    if spec.workload.kind == "synthetic":
        logger.warning("no local tokenizer.json (--tokenizer DIR): prompt lengths are counted in words")
    return None


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
    )


def _warn_failures(results: list[RequestResult], console: Console) -> None:
    failed = [r for r in results if not r.ok]
    if failed:
        console.print(f"[yellow]{len(failed)} request(s) failed; first: {failed[0].error}[/yellow]")

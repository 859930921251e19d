"""Soak: `epd serve` with a redundant layout at ~80% of its capacity for a long time, its instances
killed or stopped at random. Nothing may be lost, and nothing may grow. Not for CI.

    scripts/soak.sh [--duration 30m] [--layout 2E+2P+2D] [--rate R] [--out DIR]  (--help: the rest)

| phase    | what                                                                                 |
|----------|--------------------------------------------------------------------------------------|
| start    | `epd serve` (the demo model by default), restarts unlimited, a short silence timeout |
| capacity | a closed loop (--capacity-concurrency at once): answered requests/s; skipped by     |
|          | --rate                                                                               |
| soak     | Poisson arrivals at --load x capacity for --duration of the demo task (1-2 images,  |
|          | greedy). Every --chaos-gap s one instance is SIGKILLed or SIGSTOPped (SIGCONT once   |
|          | the server has it down), never the last available one of a role; it is disturbed    |
|          | again only once it is back. Every --sample-every s: RSS of the server and all its    |
|          | processes, their shm transfer files not read yet, KV and MM cache use (mean over    |
|          | instances), admitted requests (/metrics)                                             |
| report   | sent / answered / lost, disturbances, recoveries and restarts (/metrics), latency    |
|          | p50/p99, each series' last third against its first third; all of it in soak.json     |

Exit status 1 when a request was lost, an instance did not come back, or a series is not flat.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from epd.bench.serve.arrivals import arrival_offsets
from epd.bench.serve.client import RequestResult, prepare
from epd.bench.serve.launcher import LocalServer
from epd.bench.serve.runner import run_requests
from epd.bench.serve.shapes_task import shapes_requests
from epd.bench.serve.spec import ArrivalSpec, WorkloadSpec
from epd.proc_stat import PPID, stat_fields
from epd.transfer.shm import SEGMENT_PREFIX, default_shm_dir

Metrics = dict[str, dict[tuple, float]]  # sample name -> {sorted label items: value}
PIDS = re.compile(r"(\w+)@\S+ \(pid (\d+)\)|(\w+) is back \(pid (\d+)\)")  # the cluster's log lines
RECOVERIES = ("release_images", "start_over", "continue", "fail")
BACK_TIMEOUT_S = 180.0  # for a disturbed instance to be down, then up again as a new process
POLL_S = 0.25


@dataclass
class Disturbance:
    at_s: float  # from the start of the soak
    instance: str
    pid: int
    kind: str  # "kill" or "stop"
    down_after_s: float | None = None  # until the server had it down
    back_after_s: float | None = None  # until a new process of it served


@dataclass
class Sample:
    t_s: float
    rss_mib: float  # the server and every process below it
    shm_mib: float  # their shared-memory transfer files not read yet
    kv_cache_usage: float  # mean over the instances that report it
    mm_cache_usage: float
    admitted: float


@dataclass
class Soak:
    """What one soak saw; `report` sums it up."""

    results: list[RequestResult] = field(default_factory=list)
    disturbances: list[Disturbance] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)


# ---- what the server says ---------------------------------------------------------------------


async def scrape(client: httpx.AsyncClient, url: str) -> Metrics:
    text = (await client.get(url + "/metrics", timeout=30)).text
    out: Metrics = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def per_instance(m: Metrics, name: str) -> dict[str, float]:
    return {dict(labels)["instance"]: v for labels, v in m.get(name, {}).items()}


def instance_pids(server: LocalServer) -> dict[str, int]:
    """Each instance's latest pid, from the log: the "ready" line, then "X is back (pid N)"."""
    pids = {}
    for match in PIDS.finditer(server.log()):
        name, pid = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        pids[name] = int(pid)
    return pids


def roles(instance: str) -> set[str]:
    return set(re.match(r"[A-Z]+", instance).group())


def process_tree(root: int) -> set[int]:
    """`root` and every live process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(stat_fields(f"/proc/{entry}/stat")[PPID])
        except OSError:
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def rss_mib(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total / 1024


def shm_mib(pids: set[int]) -> float:
    """Shared-memory transfer files that processes of the server made and nobody has read yet
    (epd.transfer.shm: `epd-shm-<pid>-...`): files for a consumer that died stay until their
    producer exits."""
    total = 0
    for entry in os.scandir(default_shm_dir()):
        parts = entry.name.removeprefix(SEGMENT_PREFIX).split("-")
        if entry.name.startswith(SEGMENT_PREFIX) and parts[0].isdigit() and int(parts[0]) in pids:
            with contextlib.suppress(OSError):
                total += entry.stat().st_size
    return total / (1 << 20)


# ---- chaos --------------------------------------------------------------------------------------


class Chaos:
    """One disturbance every `gap` seconds; each waits on the server's state, bounded, never sleeps."""

    def __init__(self, server: LocalServer, client: httpx.AsyncClient, seed: int, gap: tuple[float, float]):
        self.server, self.client, self.rng, self.gap = server, client, random.Random(seed), gap
        self.busy: set[str] = set()  # disturbed and not back yet
        self.done: list[Disturbance] = []
        self.tasks: list[asyncio.Task] = []

    async def run(self, start: float, until: float) -> None:
        while time.monotonic() + self.gap[0] < until:
            await asyncio.sleep(self.rng.uniform(*self.gap))
            up = per_instance(await scrape(self.client, self.server.url), "epd_instance_up")
            victim = self._pick(up)
            if victim is not None:
                kind = self.rng.choice(("kill", "stop"))
                d = Disturbance(
                    round(time.monotonic() - start, 1), victim, instance_pids(self.server)[victim], kind
                )
                self.done.append(d)
                self.tasks.append(asyncio.create_task(self._disturb(d)))

    async def settle(self) -> None:
        """Wait until every disturbed instance is back (or its wait timed out)."""
        await asyncio.gather(*self.tasks)

    def _pick(self, up: dict[str, float]) -> str | None:
        available = sorted(n for n, v in up.items() if v == 1 and n not in self.busy)

        def spare(name: str) -> bool:  # another available instance holds each of its roles
            return all(any(o != name and r in roles(o) for o in available) for r in roles(name))

        candidates = [n for n in available if spare(n)]
        return self.rng.choice(candidates) if candidates else None

    async def _disturb(self, d: Disturbance) -> None:
        began = time.monotonic()
        try:
            os.kill(d.pid, signal.SIGKILL if d.kind == "kill" else signal.SIGSTOP)
        except ProcessLookupError:  # it died on its own meanwhile: the server restarts it anyway
            d.kind = "gone"
        self.busy.add(d.instance)
        try:
            if await self._until(lambda up: up.get(d.instance) == 0):
                d.down_after_s = round(time.monotonic() - began, 2)
            _resume(d)  # fenced now: what it says late must be ignored (the restart kills it)
            if await self._until(lambda up: up.get(d.instance) == 1 and self._pid(d.instance) != d.pid):
                d.back_after_s = round(time.monotonic() - began, 2)
        finally:
            _resume(d)
            self.busy.discard(d.instance)

    def _pid(self, name: str) -> int | None:
        return instance_pids(self.server).get(name)

    async def _until(self, condition) -> bool:
        deadline = time.monotonic() + BACK_TIMEOUT_S
        while time.monotonic() < deadline:
            if condition(per_instance(await scrape(self.client, self.server.url), "epd_instance_up")):
                return True
            await asyncio.sleep(POLL_S)
        return False


def _resume(d: Disturbance) -> None:
    if d.kind == "stop":
        try:
            os.kill(d.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass  # restarted: the old process is gone


# ---- phases -------------------------------------------------------------------------------------


def requests_for(model: str, n: int, seed: int, namespace: str) -> list:
    spec = WorkloadSpec(kind="shapes", images_per_request=(1, 2), output_tokens=64)
    return prepare(shapes_requests(spec, n, seed, namespace), model, epd_timings=False)


async def measure_capacity(url: str, model: str, n: int, concurrency: int, seed: int) -> float:
    """Answered requests per second of a closed loop, `concurrency` at once."""
    prepared = requests_for(model, n, seed, "capacity")
    arrival = ArrivalSpec(rate=math.inf, max_concurrency=concurrency)
    results, duration = await run_requests(prepared, arrival, seed, url + "/v1/chat/completions", {}, 300)
    return sum(r.ok for r in results) / duration


async def sample(
    client: httpx.AsyncClient, server: LocalServer, start: float, until: float, every: float, out: list
):
    while time.monotonic() < until:
        m = await scrape(client, server.url)
        kv = per_instance(m, "epd_instance_kv_cache_usage").values()
        mm = per_instance(m, "epd_instance_mm_cache_usage").values()
        admitted = m.get("epd_requests_admitted", {}).get((), 0.0)
        t, pids = round(time.monotonic() - start, 1), process_tree(server.proc.pid)
        out.append(
            Sample(t, round(rss_mib(pids), 1), round(shm_mib(pids), 3), _mean(kv), _mean(mm), admitted)
        )
        await asyncio.sleep(every)


def _mean(values) -> float:
    values = list(values)
    return round(statistics.fmean(values), 5) if values else 0.0


async def soak(server: LocalServer, model: str, rate: float, args: argparse.Namespace) -> Soak:
    n = max(1, round(rate * args.duration))
    prepared = requests_for(model, n, args.seed, "soak")
    arrival = ArrivalSpec(rate=rate)
    found = Soak()
    async with httpx.AsyncClient() as client:
        start = time.monotonic()
        until = start + arrival_offsets(n, arrival, args.seed)[-1]
        chaos = Chaos(server, client, args.seed, args.chaos_gap)
        sampler = asyncio.create_task(
            sample(client, server, start, until + 30, args.sample_every, found.samples)
        )
        chaos_loop = asyncio.create_task(chaos.run(start, until))
        url = server.url + "/v1/chat/completions"
        found.results, _ = await run_requests(prepared, arrival, args.seed, url, {}, args.request_timeout)
        await chaos_loop
        await chaos.settle()
        await sampler  # 30 s past the last arrival: the idle tail shows what is left pinned
        found.disturbances = chaos.done
    return found


async def until_idle(client: httpx.AsyncClient, url: str, timeout: float = 60.0) -> Metrics:
    """/metrics once nothing is admitted and no instance holds KV or pinned MM blocks (instances
    report every 0.25 s), or after `timeout` (the report then says what was still held)."""
    deadline = time.monotonic() + timeout
    while True:
        m = await scrape(client, url)
        held = [per_instance(m, f"epd_instance_{name}_cache_usage").values() for name in ("kv", "mm")]
        if (m.get("epd_requests_admitted", {}).get(()) == 0 and not any(map(any, held))) or (
            time.monotonic() > deadline
        ):
            return m
        await asyncio.sleep(POLL_S)


# ---- report -------------------------------------------------------------------------------------


def flatness(values: list[float], tolerance: float, relative: bool) -> dict:
    """The last third's mean against the first third's: flat within `tolerance` (of the first
    third's mean where `relative`, else absolute)."""
    third = len(values) // 3
    if third < 2:
        return {"first": None, "last": None, "flat": None}
    first, last = statistics.fmean(values[:third]), statistics.fmean(values[-third:])
    bound = tolerance * first if relative else tolerance
    return {"first": round(first, 4), "last": round(last, 4), "flat": abs(last - first) <= bound}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 3)


def report(found: Soak, final: Metrics, args: argparse.Namespace) -> dict:
    ok = [r for r in found.results if r.ok]
    errors: dict[str, int] = {}
    for r in found.results:
        if not r.ok:
            errors[(r.error or "?")[:160]] = errors.get((r.error or "?")[:160], 0) + 1
    # The serving part only: the idle tail after the last answer says whether anything stays pinned.
    busy = [s for s in found.samples if s.admitted > 0] or found.samples
    recoveries = {
        kind: sum(per_instance(final, f"epd_instance_requests_{kind}_total").values()) for kind in RECOVERIES
    }
    return {
        "requests": {"sent": len(found.results), "answered": len(ok), "lost": len(found.results) - len(ok)},
        "errors": errors,
        "correct": sum(bool(r.correct) for r in ok),
        # The demo model misses a few: compare with an undisturbed run of the same requests (seed).
        "incorrect": [r.index for r in ok if r.correct is False],
        "disturbances": {
            "kill": sum(d.kind == "kill" for d in found.disturbances),
            "stop": sum(d.kind == "stop" for d in found.disturbances),
            "not_back": [d.instance for d in found.disturbances if d.back_after_s is None],
        },
        "recoveries": recoveries,
        "restarts": per_instance(final, "epd_instance_restarts_total"),
        "latency_s": {
            "e2e_p50": percentile([r.e2e for r in ok], 0.5),
            "e2e_p99": percentile([r.e2e for r in ok], 0.99),
            "ttft_p50": percentile([r.ttft for r in ok], 0.5),
            "ttft_p99": percentile([r.ttft for r in ok], 0.99),
        },
        "flat": {
            "rss_mib": flatness([s.rss_mib for s in busy], args.rss_tolerance, relative=True),
            "shm_mib": flatness([s.shm_mib for s in busy], args.shm_tolerance, relative=False),
            "kv_cache_usage": flatness([s.kv_cache_usage for s in busy], args.usage_tolerance, False),
            "mm_cache_usage": flatness([s.mm_cache_usage for s in busy], args.usage_tolerance, False),
        },
        "idle_at_end": {
            "admitted": final.get("epd_requests_admitted", {}).get((), None),
            # Instances that still hold KV blocks or pin MM blocks with nothing running: a leak.
            "kv_cache_usage": _held(final, "epd_instance_kv_cache_usage"),
            "mm_cache_usage": _held(final, "epd_instance_mm_cache_usage"),
        },
    }


def _held(m: Metrics, name: str) -> dict[str, float]:
    return {instance: v for instance, v in per_instance(m, name).items() if v}


def passed(summary: dict) -> bool:
    flat = all(f["flat"] is not False for f in summary["flat"].values())
    idle = summary["idle_at_end"]
    return (
        summary["requests"]["lost"] == 0
        and not summary["disturbances"]["not_back"]
        and flat
        and idle["admitted"] == 0
        and not idle["kv_cache_usage"]
        and not idle["mm_cache_usage"]
    )


# ---- the command --------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '1h' -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 1h)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def parse_gap(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    return float(low), float(high or low)


def parser() -> argparse.ArgumentParser:
    about = "epd serve under ~80% load while its instances are killed or stopped at random"
    p = argparse.ArgumentParser(prog="scripts/soak.sh", description=about)
    p.add_argument("--model", default=None, help="model directory (default: the demo model)")
    p.add_argument("--layout", default="2E+2P+2D")
    p.add_argument("--duration", type=parse_duration, default=1800.0, help="soak length (30m; 90s, 1h)")
    p.add_argument("--rate", type=float, default=None, help="requests/s (default: --load x capacity)")
    p.add_argument("--load", type=float, default=0.8, help="share of the measured capacity")
    p.add_argument("--capacity-requests", type=int, default=200)
    p.add_argument("--capacity-concurrency", type=int, default=16)
    p.add_argument("--chaos-gap", type=parse_gap, default=(20.0, 40.0), help="seconds between disturbances")
    p.add_argument(
        "--silence-timeout", type=float, default=5.0, help="the server's --instance-silence-timeout"
    )
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("--rss-tolerance", type=float, default=0.2, help="relative, last vs first third")
    p.add_argument("--usage-tolerance", type=float, default=0.05, help="absolute share, last vs first third")
    p.add_argument("--shm-tolerance", type=float, default=64.0, help="MiB, last vs first third")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--serve-args", default="--kv-cache-memory-bytes 128MiB", help="more `epd serve` flags")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("soak"))
    return p


def serve_args(args: argparse.Namespace) -> list[str]:
    from epd.demo import DEMO_MODEL_DIR

    model = args.model or str(DEMO_MODEL_DIR)
    flags = ["--model", model, "--layout", args.layout, "--served-model-name", "soak"]
    flags += ["--instance-silence-timeout", str(args.silence_timeout), "--instance-restarts", "1000000"]
    return flags + args.serve_args.split()


async def main_async(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    with LocalServer(serve_args(args), args.out / "server.log") as server:
        capacity = None
        if args.rate is None:
            capacity = await measure_capacity(
                server.url, "soak", args.capacity_requests, args.capacity_concurrency, args.seed
            )
        rate = args.rate or args.load * capacity
        measured = "not measured" if capacity is None else f"{capacity:.2f} req/s"
        print(f"capacity {measured}; soak at {rate:.2f} req/s for {args.duration:g} s", flush=True)
        found = await soak(server, "soak", rate, args)
        async with httpx.AsyncClient() as client:
            final = await until_idle(client, server.url)
    summary = report(found, final, args)
    doc = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "capacity_rps": capacity,
        "rate_rps": rate,
        "summary": summary,
        "passed": passed(summary),
        "disturbances": [asdict(d) for d in found.disturbances],
        "samples": [asdict(s) for s in found.samples],
        "results": [
            {
                "index": r.index,
                "ok": r.ok,
                "correct": r.correct,
                "e2e": r.e2e,
                "ttft": r.ttft,
                "error": r.error,
            }
            for r in found.results
        ],
    }
    (args.out / "soak.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: doc[k] for k in ("capacity_rps", "rate_rps", "summary", "passed")}, indent=1))
    print(f"written: {args.out / 'soak.json'}")
    return 0 if doc["passed"] else 1


def main() -> None:
    raise SystemExit(asyncio.run(main_async(parser().parse_args())))


if __name__ == "__main__":
    main()

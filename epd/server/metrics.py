"""Prometheus metrics of one server: its own registry, so several apps in one process never mix.

| metric                                   | kind      | labels             | from                          |
|------------------------------------------|-----------|--------------------|-------------------------------|
| epd_http_requests_total                  | counter   | endpoint, status   | every answer (499: client left)|
| epd_request_finished_total               | counter   | finish_reason      | finished generations          |
| epd_prompt_tokens_total / _generation_.. | counter   |                    | finished generations          |
| epd_time_to_first_token_seconds          | histogram |                    | server-side, arrival -> token |
| epd_time_per_output_token_seconds        | histogram |                    | (e2e - ttft) / (tokens - 1)   |
| epd_e2e_request_latency_seconds          | histogram |                    | arrival -> last token         |
| epd_request_stage_seconds                | histogram | stage              | RequestMetrics.breakdown()    |
| epd_requests_admitted                    | gauge     |                    | admission count now           |
| epd_requests_rejected_late_total         | counter   |                    | 429s of --reject-late         |
| epd_instance_<stat>[_total]              | gauge/ctr | instance           | AsyncEngine.instance_stats()  |
| epd_instance_up                          | gauge     | instance           | AsyncEngine.instances_up()    |
| epd_role_switches_total                  | counter   | from_roles,        | AsyncEngine.role_switches()   |
|                                          |           | to_roles, outcome  | (done or failed)              |
| epd_role_switch_phase_seconds            | histogram | phase              | switches done: drain,         |
|                                          |           |                    | reconfigure (weights, memory),|
|                                          |           |                    | rejoin, total                 |
| epd_role_switches_auto_total             | counter   | from_roles,        | those of them started by      |
|                                          |           | to_roles, reason,  | --role-switching auto; reason:|
|                                          |           | outcome            | the stage relieved            |
| epd_api_thread_cpu_seconds               | gauge     | thread             | /proc/self/task: the API      |
|                                          |           |                    | process's CPU by thread/pool  |
|                                          |           |                    | (epd.server.thread_cpu)       |
| epd_shared_file_bytes_in_use / _capacity | gauge     |                    | image files in the memory the |
| epd_shared_files_placed_total            | counter   |                    | encoders of this host read    |
| epd_shared_files_refused_total           | counter   |                    | (cluster.shared_files); those |
|                                          |           |                    | refused went by the socket    |

Instance counters are cumulative totals kept by the instances: a collector reads them at
scrape time instead of re-incrementing our own counters (which would double count).

A dead instance (epd_instance_up 0) has no "now": its gauges leave /metrics, so no dashboard shows
its last running_requests or kv_cache_usage as current. Its counters stay at their last values:
they are still true totals, and sums over instances do not drop (rate() would read a drop as a
counter reset).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from epd.cluster.shared_files import SharedFiles
from epd.cluster.stats import STAT_HELP
from epd.outputs import RequestOutput
from epd.server.thread_cpu import ThreadCpuCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
ENDPOINTS += ("/admin/instances",)
SWITCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
SWITCH_BUCKETS += (5, 10, 30, 60, 120, 300, 600)


class ServerMetrics:
    def __init__(
        self,
        instance_stats: Callable[[], dict[str, dict[str, float]]],
        instances_up: Callable[[], dict[str, bool]],
        admitted: Callable[[], int],
        role_switches: Callable[[], list[dict]] = list,
        shared_files: SharedFiles | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.http_requests = Counter(
            "epd_http_requests", "HTTP answers by endpoint and status", ["endpoint", "status"], registry=reg
        )
        self.finished = Counter(
            "epd_request_finished", "generations finished, by finish reason", ["finish_reason"], registry=reg
        )
        self.prompt_tokens = Counter("epd_prompt_tokens", "prompt tokens (images included)", registry=reg)
        self.generation_tokens = Counter("epd_generation_tokens", "generated tokens", registry=reg)
        self.ttft = Histogram(
            "epd_time_to_first_token_seconds", "arrival to first token", buckets=LATENCY_BUCKETS, registry=reg
        )
        self.tpot = Histogram(
            "epd_time_per_output_token_seconds",
            "mean time per token after the first",
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            "epd_e2e_request_latency_seconds", "arrival to last token", buckets=LATENCY_BUCKETS, registry=reg
        )
        self.stage = Histogram(
            "epd_request_stage_seconds",
            "seconds per stage of the request lifetime (and preprocess)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.rejected_late = Counter(
            "epd_requests_rejected_late",
            "requests refused with 429: they cannot meet their TTFT deadline (--reject-late)",
            registry=reg,
        )
        reg.register(_EngineCollector(instance_stats, instances_up, admitted))
        reg.register(_SwitchCollector(role_switches))
        reg.register(ThreadCpuCollector())
        if shared_files is not None:
            reg.register(_SharedFilesCollector(shared_files))

    def observe_finished(self, out: RequestOutput, timing: RequestTiming) -> None:
        """Record a generation that ran to its end (stop or length); aborted ones are not latencies."""
        completion = out.outputs[0]
        self.finished.labels(completion.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(len(completion.token_ids))
        if completion.finish_reason not in ("stop", "length"):
            return
        if timing.ttft is not None:
            self.ttft.observe(timing.ttft)
        if timing.e2e is not None:
            self.e2e.observe(timing.e2e)
            if timing.ttft is not None and len(completion.token_ids) > 1:
                self.tpot.observe((timing.e2e - timing.ttft) / (len(completion.token_ids) - 1))
        self.stage.labels("preprocess").observe(timing.preprocess)
        for stage, seconds in out.metrics.breakdown().items():
            self.stage.labels(stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SharedFilesCollector:
    """The shared image files at scrape time: what they hold now, and where files went."""

    def __init__(self, shared: SharedFiles) -> None:
        self.shared = shared

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "epd_shared_file_bytes_in_use",
            "bytes of image files in flight in shared memory",
            self.shared.used,
        )
        yield GaugeMetricFamily(
            "epd_shared_file_bytes_capacity",
            "the shared memory for image files (--shared-file-bytes)",
            self.shared.size,
        )
        yield CounterMetricFamily(
            "epd_shared_files_placed", "image files decoded into shared memory", self.shared.taken
        )
        yield CounterMetricFamily(
            "epd_shared_files_refused",
            "image files that found the shared memory full and went over the socket",
            self.shared.refused,
        )


class RequestTiming:
    """Server-side clock of one request (time.time(), comparable with lifetime events)."""

    def __init__(self, received: float) -> None:
        self.received = received
        self.preprocess = 0.0
        self.first_token: float | None = None
        self.finished: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.received

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.received

    def report(self, out: RequestOutput) -> dict:
        """The `epd_timings` object of a response: seconds, server clock plus engine stages."""
        return {
            "ttft": self.ttft,
            "e2e": self.e2e,
            "preprocess": self.preprocess,
            "stages": out.metrics.breakdown(),
        }


class _EngineCollector:
    """Reads the instances' latest figures at scrape time."""

    def __init__(
        self,
        instance_stats: Callable[[], dict[str, dict[str, float]]],
        instances_up: Callable[[], dict[str, bool]],
        admitted: Callable[[], int],
    ) -> None:
        self._stats, self._up, self._admitted = instance_stats, instances_up, admitted

    def describe(self) -> list[Metric]:
        return []  # names vary with what instances report; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        stats, up = self._stats(), self._up()
        names = sorted({name for s in stats.values() for name in s})
        for name in names:
            help_text = STAT_HELP.get(name, name.replace("_", " "))
            is_counter = name.endswith("_total")
            if is_counter:
                family: Metric = CounterMetricFamily(
                    f"epd_instance_{name[:-6]}", help_text, labels=["instance"]
                )
            else:
                family = GaugeMetricFamily(f"epd_instance_{name}", help_text, labels=["instance"])
            for instance in sorted(stats):
                # A dead instance's gauges go (see the module docstring); its counters stay.
                if name in stats[instance] and (is_counter or up.get(instance, False)):
                    family.add_metric([instance], float(stats[instance][name]))
            if family.samples:
                yield family
        up_family = GaugeMetricFamily("epd_instance_up", "1 while the instance is alive", labels=["instance"])
        for instance, alive in sorted(up.items()):
            up_family.add_metric([instance], 1.0 if alive else 0.0)
        yield up_family
        yield GaugeMetricFamily(
            "epd_requests_admitted", "requests admitted and not finished", value=float(self._admitted())
        )


class _SwitchCollector:
    """Counts the role switches the engine finished (its records, epd.cluster.router.role_switch)
    at scrape time, like the instance counters: the records are the totals, nothing is counted twice."""

    def __init__(self, role_switches: Callable[[], list[dict]]) -> None:
        self._switches = role_switches

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        records = self._switches()
        counts: dict[tuple[str, str, str], int] = {}
        for r in records:
            key = (r["from"], r["to"], "failed" if r["error"] else "done")
            counts[key] = counts.get(key, 0) + 1
        switches = CounterMetricFamily(
            "epd_role_switches", "role switches finished", labels=["from_roles", "to_roles", "outcome"]
        )
        for labels, count in sorted(counts.items()):
            switches.add_metric(list(labels), float(count))
        yield switches
        yield _auto_switches(records)
        phases = HistogramMetricFamily(
            "epd_role_switch_phase_seconds", "seconds per phase of the role switches done", labels=["phase"]
        )
        done = [r["timings"] for r in records if not r["error"]]
        for phase in ("drain", "reconfigure", "weights", "memory", "rejoin", "total"):
            values = [t[phase] for t in done if t.get(phase) is not None]
            buckets = [(str(b), float(sum(v <= b for v in values))) for b in SWITCH_BUCKETS]
            buckets.append(("+Inf", float(len(values))))
            phases.add_metric([phase], buckets, sum_value=float(sum(values)))
        yield phases


def _auto_switches(records: list[dict]) -> CounterMetricFamily:
    """The switches the automatic policy started (epd.cluster.router.auto_roles), by the stage each
    relieved: a subset of epd_role_switches_total."""
    counts: dict[tuple[str, str, str, str], int] = {}
    for r in records:
        if r.get("trigger") == "auto":
            key = (r["from"], r["to"], r.get("reason") or "", "failed" if r["error"] else "done")
            counts[key] = counts.get(key, 0) + 1
    family = CounterMetricFamily(
        "epd_role_switches_auto",
        "role switches the automatic policy started and that finished",
        labels=["from_roles", "to_roles", "reason", "outcome"],
    )
    for labels, count in sorted(counts.items()):
        family.add_metric(list(labels), float(count))
    return family


class StatusCounter:
    """ASGI middleware: counts every answer by endpoint and status, including error answers
    and clients that left before one was sent (status 499, as nginx logs them)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"  # raw paths would be unbounded labels
        status = "499"

        async def send_and_count(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        except Exception:  # answered by the app's last-resort handler, outside this middleware
            status = "500" if status == "499" else status
            raise
        finally:
            self.metrics.http_requests.labels(endpoint, status).inc()

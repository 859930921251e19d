"""CPU time of the API process by thread, for /metrics: where a front end's cores go.

    epd_api_thread_cpu_seconds{thread="MainThread"}         the event loop: HTTP reads, JSON, the app
    epd_api_thread_cpu_seconds{thread="epd-engine"}         the router (AsyncEngine's thread)
    epd_api_thread_cpu_seconds{thread="epd-input-images"}   input processing: base64, hashing, headers
    epd_api_thread_cpu_seconds{thread="ZMQbg/IO"}           zmq's I/O threads: the sends to instances

A pool's threads are summed under the pool's name ("epd-input-images_3" -> "epd-input-images");
threads started outside Python go by their OS name (zmq's and libuv's name theirs; others, such
as torch's, carry the process's own name: "python", or "epd" when started as `epd serve`). Read from
/proc/self/task at scrape time (Linux; elsewhere the metric is absent). A thread that has ended
is no longer counted, so a sum may drop when a pool shrinks: a gauge of the threads alive, in
seconds since each started.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric

from epd.proc_stat import STIME, UTIME, stat_fields

TASKS = Path("/proc/self/task")
_NUMBERED = re.compile(r"[_/-]?\d+$")  # "epd-input-images_3", "ZMQbg/IO/0": one name per pool


def thread_cpu_seconds() -> dict[str, float]:
    """user + system seconds of this process's live threads, by thread group; {} without /proc."""
    if not TASKS.is_dir():
        return {}
    python_names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    ticks = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = {}
    for task in TASKS.iterdir():
        try:
            fields = stat_fields(task / "stat")
            name = python_names.get(int(task.name)) or (task / "comm").read_text().strip()
        except (OSError, ValueError):
            continue  # ended between the listing and the read
        group = _NUMBERED.sub("", name) or name
        seconds[group] = seconds.get(group, 0.0) + (int(fields[UTIME]) + int(fields[STIME])) / ticks
    return seconds


class ThreadCpuCollector:
    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        by_thread = thread_cpu_seconds()
        if not by_thread:
            return
        family = GaugeMetricFamily(
            "epd_api_thread_cpu_seconds",
            "CPU seconds (user + system) of the API process's live threads, by thread or pool",
            labels=["thread"],
        )
        for name, seconds in sorted(by_thread.items()):
            family.add_metric([name], seconds)
        yield family

"""An instance process that dies: while a role has no live instance /health and new requests answer
503 and /metrics drops its gauges; while others hold its roles /health says "degraded"; a restarted
instance brings it back to 200; shutdown still exits 0."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from .helpers import ServerProcess, alive, image_message, metrics


def instance_pids(srv: ServerProcess) -> list[int]:
    """The server's instance processes (its children, less multiprocessing's resource tracker)."""
    pids = []
    for pid in sorted(srv.descendants()):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            pids.append(pid)
    return pids


def instance_pid(srv: ServerProcess, name: str) -> int:
    """An instance's pid, from the cluster's "layout ... ready: E0@cpu (pid 123), ..." log line."""
    match = re.search(rf"\b{name}@\S+ \(pid (\d+)\)", srv.log())
    assert match, f"no pid logged for {name}:\n{srv.log()[-3000:]}"
    return int(match.group(1))


def instance_gauges(m: dict[str, dict[tuple, float]], instance: str) -> set[str]:
    """Names of the per-instance gauges /metrics lists for `instance` (counters end in _total)."""
    names = {n for n in m if n.startswith("epd_instance_") and not n.endswith("_total")}
    return {n for n in names - {"epd_instance_up"} if (("instance", instance),) in m[n]}


def wait_for_gauges(url: str, instance: str, names: set[str], timeout: float = 30.0) -> None:
    """Instances report every 250 ms: wait until `instance` has reported these gauges."""
    deadline = time.monotonic() + timeout
    while not names <= instance_gauges(metrics(url), instance):
        assert time.monotonic() < deadline, f"{instance} did not report {names} within {timeout} s"
        time.sleep(0.2)


def test_dead_instance_turns_the_server_unhealthy(model: str, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("logs") / "instance_down.log"
    # No restart: what the server says while a role has no live instance, for as long as we look.
    args = ["--model", model, "--layout", "1E+1PD", "--served-model-name", "m", "--instance-restarts", "0"]
    srv = ServerProcess(args, log).start()
    children = srv.descendants()
    try:
        victim = instance_pid(srv, "PD0")
        assert sorted(instance_pids(srv)) == sorted([victim, instance_pid(srv, "E0")])
        wait_for_gauges(srv.url, "PD0", {"epd_instance_running_requests", "epd_instance_kv_cache_usage"})
        wait_for_gauges(srv.url, "E0", {"epd_instance_encode_queue_images"})
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while httpx.get(srv.url + "/health", timeout=5).status_code == 200:
            assert time.monotonic() < deadline, "/health stayed 200 with an instance dead"
            time.sleep(0.2)
        health = httpx.get(srv.url + "/health", timeout=5)
        assert health.status_code == 503 and "instances down" in health.json()["error"]["message"]
        body = {"model": "m", "messages": image_message("hi", 1), "max_tokens": 2}
        resp = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
        assert resp.status_code == 503 and "Retry-After" in resp.headers
        assert resp.json()["error"]["type"] == "service_unavailable"
        m = metrics(srv.url)
        assert m["epd_instance_up"] == {(("instance", "E0"),): 1.0, (("instance", "PD0"),): 0.0}
        assert instance_gauges(m, "PD0") == set(), "a dead instance's gauges are still listed"
        assert "epd_instance_encode_queue_images" in instance_gauges(m, "E0")  # the live one's stay
        assert (("instance", "PD0"),) in m["epd_instance_steps_total"]  # counters stay: true totals
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-3000:]
    deadline = time.monotonic() + 15
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(children)


def wait_for_health(url: str, status: int, timeout: float = 60.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while (health := httpx.get(url + "/health", timeout=5)).status_code != status:
        assert time.monotonic() < deadline, f"/health not {status} within {timeout} s: {health.text}"
        time.sleep(0.2)
    return health


def test_a_dead_instance_whose_role_others_hold_leaves_the_server_degraded(
    model: str, tmp_path_factory: pytest.TempPathFactory
):
    log = tmp_path_factory.mktemp("logs") / "degraded.log"
    args = ["--model", model, "--layout", "1E+1P+2D", "--served-model-name", "m", "--instance-restarts", "0"]
    srv = ServerProcess(args, log).start()
    try:
        os.kill(instance_pid(srv, "D1"), signal.SIGKILL)
        deadline = time.monotonic() + 15
        degraded = {"status": "degraded", "instances_down": ["D1"]}
        while not (health := httpx.get(srv.url + "/health", timeout=5)).content or health.json() != degraded:
            assert health.status_code == 200 and time.monotonic() < deadline, health.text
            time.sleep(0.2)
        body = {"model": "m", "messages": image_message("hi", 1), "max_tokens": 2}
        for _ in range(3):  # D0 takes them all
            assert httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
        assert "epd_instance_restarts_total" not in metrics(srv.url), "--instance-restarts 0"
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


def test_a_restarted_instance_brings_the_server_back(model: str, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("logs") / "restart.log"
    srv = ServerProcess(["--model", model, "--layout", "1E+1PD", "--served-model-name", "m"], log).start()
    try:
        victim = instance_pid(srv, "PD0")
        os.kill(victim, signal.SIGKILL)
        wait_for_health(srv.url, 503, timeout=15)
        wait_for_health(srv.url, 200)
        body = {"model": "m", "messages": image_message("hi", 1), "max_tokens": 2}
        assert httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
        m = metrics(srv.url)
        assert m["epd_instance_up"][(("instance", "PD0"),)] == 1.0
        assert m["epd_instance_restarts_total"] == {(("instance", "PD0"),): 1.0}
        assert victim not in instance_pids(srv), "PD0 is a new process"
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]

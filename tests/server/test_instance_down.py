"""An instance process that dies: /health and new requests answer 503; shutdown still exits 0."""

from __future__ import annotations

import os
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


def test_dead_instance_turns_the_server_unhealthy(model: str, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("logs") / "instance_down.log"
    srv = ServerProcess(["--model", model, "--layout", "1E+1PD", "--served-model-name", "m"], log).start()
    children = srv.descendants()
    try:
        victims = instance_pids(srv)
        assert len(victims) == 2
        os.kill(victims[0], signal.SIGKILL)
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
        assert sorted(metrics(srv.url)["epd_instance_up"].values()) == [0.0, 1.0]
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-3000:]
    deadline = time.monotonic() + 15
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(children)

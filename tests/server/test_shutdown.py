"""SIGINT past the grace period: open streams end with an SSE error event and [DONE], a waiting
request gets a 503, one log line counts them, and no traceback is logged."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest

from .helpers import ServerProcess, gauge, wait_for_metrics

NAME = "tiny-shutdown"
STREAMS = 4
# Thousands of decode steps: the requests still run when the signal comes (0 s of grace).
LONG = {"model": NAME, "max_tokens": 3000, "ignore_eos": True}


@pytest.fixture
def doomed_server(model: str, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    log = tmp_path_factory.mktemp("logs") / "shutdown_server.log"
    args = ["--model", model, "--served-model-name", NAME, "--layout", "1EPD", "--shutdown-timeout", "0"]
    srv = ServerProcess(args, log).start()
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


async def stream(http: httpx.AsyncClient, i: int, started: asyncio.Event) -> list[str]:
    body = {**LONG, "stream": True, "messages": [{"role": "user", "content": f"stream {i}"}]}
    events = []
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                started.set()
    return events


async def run_and_interrupt(srv: ServerProcess) -> tuple[list[list[str]], httpx.Response]:
    async with httpx.AsyncClient(base_url=srv.url, timeout=120) as http:
        started = [asyncio.Event() for _ in range(STREAMS)]
        streams = [asyncio.ensure_future(stream(http, i, started[i])) for i in range(STREAMS)]
        waiting = asyncio.ensure_future(
            http.post("/v1/completions", json={**LONG, "prompt": "a waiting request"})
        )
        for event in started:
            await event.wait()
        await asyncio.to_thread(
            wait_for_metrics, srv.url, lambda m: gauge(m, "epd_requests_admitted") == STREAMS + 1
        )
        srv.proc.send_signal(signal.SIGINT)
        return await asyncio.gather(*streams), await waiting


def test_streams_open_past_the_grace_period_end_with_an_error_event(doomed_server: ServerProcess):
    all_events, waiting = asyncio.run(run_and_interrupt(doomed_server))
    for events in all_events:
        *chunks, error, done = events
        assert done == "[DONE]"
        assert json.loads(error)["error"] == {
            "message": "the server is shutting down",
            "type": "service_unavailable",
            "param": None,
            "code": "service_unavailable",
        }
        assert all(json.loads(c)["choices"][0]["finish_reason"] is None for c in chunks)
    assert waiting.status_code == 503 and "shutting down" in waiting.json()["error"]["message"]
    assert doomed_server.stop() == 0
    log = doomed_server.log()
    assert f"shutdown: ended {STREAMS} open streams and 1 other requests" in log
    assert "Traceback" not in log and "ERROR" not in log

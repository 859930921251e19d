"""A second server (aggregated 1EPD, --max-queued-requests 2): admission, remote media, drain.

The last test stops the server with SIGINT while a stream is in flight: it must finish.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from epd.testing.images import noise_image

from .helpers import (
    ServerProcess,
    alive,
    encode_image,
    gauge,
    image_message,
    wait_for_metrics,
    wait_until_idle,
)

NAME = "tiny-1epd"
LONG = {"model": NAME, "prompt": "count with me", "max_tokens": 300, "ignore_eos": True, "temperature": 0}
HOLDER = {**LONG, "max_tokens": 1000}  # holds an admission slot while the burst arrives


@pytest.fixture(scope="module")
def small_server(model: str, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    log = tmp_path_factory.mktemp("logs") / "small_server.log"
    args = ["--model", model, "--served-model-name", NAME, "--layout", "1EPD", "--max-queued-requests", "2"]
    args += ["--allow-remote-media", "--remote-media-timeout", "3", "--shutdown-timeout", "30"]
    srv = ServerProcess(args, log).start()
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


async def burst(url: str, n: int) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """Two long requests fill admission (the server says so), then `n` more arrive."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        holders = [asyncio.ensure_future(http.post("/v1/completions", json=HOLDER)) for _ in range(2)]
        await asyncio.to_thread(
            wait_for_metrics, url, lambda m: gauge(m, "epd_requests_admitted") == 2, 60, "admission full"
        )
        refused = await asyncio.gather(*(http.post("/v1/completions", json=LONG) for _ in range(n)))
        return list(refused), list(await asyncio.gather(*holders))


def test_full_admission_answers_429_and_loses_nothing(small_server: ServerProcess):
    refused, served = asyncio.run(burst(small_server.url, 6))
    for r in refused:  # the holders are still admitted: a finished one would have left admission
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    for r in served:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 1000
    wait_until_idle(small_server.url)
    assert httpx.post(small_server.url + "/v1/completions", json=LONG, timeout=60).status_code == 200


class _ImageHandler(BaseHTTPRequestHandler):
    hits = 0
    png = encode_image(noise_image(40, 40, seed=1), "PNG")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, *args: object) -> None:
        pass


def test_remote_media_never_reaches_loopback(small_server: ServerProcess):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]"):
            url = f"http://{host}:{httpd.server_port}/cat.png"
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]
            body = {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 2}
            resp = httpx.post(small_server.url + "/v1/chat/completions", json=body, timeout=30)
            assert resp.status_code == 400, resp.text
            assert "non-public address" in resp.json()["error"]["message"]
        assert _ImageHandler.hits == 0
    finally:
        httpd.shutdown()


def test_sigint_drains_in_flight_stream_then_exits_0(small_server: ServerProcess):
    children = small_server.descendants()
    body = {
        "model": NAME,
        "messages": image_message("go", 9),
        "max_tokens": 500,
        "ignore_eos": True,
        "stream": True,
    }
    events = []
    with httpx.stream("POST", small_server.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        events.append(next(line for line in lines if line.startswith("data: ")))
        wait_for_metrics(small_server.url, lambda m: gauge(m, "epd_requests_admitted") == 1)  # running
        small_server.proc.send_signal(signal.SIGINT)
        wait_until_refused(small_server.url + "/health")  # no longer accepting
        events += [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert small_server.stop() == 0
    assert "Waiting for connections to close" in small_server.log()  # the stream was still running
    deadline = time.monotonic() + 15
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(children)


def wait_until_refused(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=5)
        except httpx.ConnectError:
            return
        time.sleep(0.05)
    raise AssertionError(f"{url} still accepted connections {timeout} s after SIGINT")

"""Clients that go away mid-request: their requests are aborted and every block returns."""

from __future__ import annotations

import asyncio

import httpx

from .conftest import API_KEY, MODEL_NAME
from .helpers import ServerProcess, image_message, wait_until_idle

NUM_STREAMS = 20
MAX_TOKENS = 900  # prompt + this fits the main server's 1024-token context


def long_request(i: int, stream: bool) -> dict:
    # A distinct image per request, so each pins its own MM cache blocks while it runs.
    return {
        "model": MODEL_NAME,
        "messages": image_message(f"request {i}", 1000 + i),
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": stream,
    }


async def open_and_drop(http: httpx.AsyncClient, i: int, started: list[int]) -> None:
    async with http.stream("POST", "/v1/chat/completions", json=long_request(i, stream=True)) as resp:
        assert resp.status_code == 200
        chunks = 0
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                chunks += 1
                if chunks == 3:  # the role chunk, then a couple of tokens: then hang up
                    started.append(i)
                    return


async def drop_streams(url: str) -> list[int]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    started: list[int] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
        await asyncio.wait_for(
            asyncio.gather(*(open_and_drop(http, i, started) for i in range(NUM_STREAMS))), 120
        )
    return started


def decode_steps(m: dict) -> float:
    return m["epd_instance_steps_total"][(("instance", "D0"),)]


def assert_nothing_runs(m: dict) -> None:
    for gauge in ("epd_instance_running_requests", "epd_instance_waiting_requests"):
        assert not any(m[gauge].values()), m[gauge]


def test_dropped_streams_free_their_blocks(server: ServerProcess):
    before = wait_until_idle(server.url)
    started = asyncio.run(drop_streams(server.url))
    assert len(started) == NUM_STREAMS
    after = wait_until_idle(server.url, timeout=60)  # KV and pinned MM blocks all back
    assert_nothing_runs(after)
    # Run to the end, the streams would have taken MAX_TOKENS decode steps at least.
    assert decode_steps(after) - decode_steps(before) < MAX_TOKENS / 2, "dropped streams kept decoding"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


async def post_and_drop(url: str, i: int) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
        request = http.post("/v1/chat/completions", json=long_request(i, stream=False))
        try:
            await asyncio.wait_for(request, 1.5)  # the answer would take far longer: give up
        except asyncio.TimeoutError:
            pass


def test_dropped_non_streaming_requests_are_aborted(server: ServerProcess):
    async def run() -> None:
        await asyncio.gather(*(post_and_drop(server.url, 100 + i) for i in range(5)))

    before = wait_until_idle(server.url)
    asyncio.run(run())
    after = wait_until_idle(server.url, timeout=60)
    assert_nothing_runs(after)
    assert decode_steps(after) - decode_steps(before) < MAX_TOKENS / 2, "dropped requests kept decoding"
    key = (("endpoint", "/v1/chat/completions"), ("status", "499"))
    assert after["epd_http_requests_total"][key] - before["epd_http_requests_total"].get(key, 0) == 5
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200

"""Clients that go away mid-request: their requests are aborted and every block returns."""

from __future__ import annotations

import asyncio

import httpx

from .conftest import API_KEY, MODEL_NAME
from .helpers import ServerProcess, gauge, image_message, wait_for_metrics, wait_until_idle

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
    for name in ("epd_instance_running_requests", "epd_instance_waiting_requests"):
        assert not any(m[name].values()), m[name]


def test_dropped_streams_free_their_blocks(server: ServerProcess):
    before = wait_until_idle(server.url)
    started = asyncio.run(drop_streams(server.url))
    assert len(started) == NUM_STREAMS
    after = wait_until_idle(server.url, timeout=60)  # KV and pinned MM blocks all back
    assert_nothing_runs(after)
    # Run to the end, the streams would have taken MAX_TOKENS decode steps at least.
    assert decode_steps(after) - decode_steps(before) < MAX_TOKENS / 2, "dropped streams kept decoding"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def decoding(n: int):
    """All `n` requests decoding, and none finished (a finished one leaves admission at once)."""
    return lambda m: (
        gauge(m, "epd_requests_admitted") == n
        and gauge(m, "epd_instance_running_requests", instance="D0") == n
    )


async def post_and_drop(url: str, n: int) -> list[asyncio.Task]:
    """Send `n` non-streaming requests; hang up once the server reports all of them decoding."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
        body = [long_request(100 + i, stream=False) for i in range(n)]
        posts = [asyncio.ensure_future(http.post("/v1/chat/completions", json=b)) for b in body]
        await asyncio.to_thread(wait_for_metrics, url, decoding(n), 60, f"{n} requests decoding")
        for post in posts:
            post.cancel()
        await asyncio.gather(*posts, return_exceptions=True)
        return posts


def test_dropped_non_streaming_requests_are_aborted(server: ServerProcess):
    before = wait_until_idle(server.url)
    posts = asyncio.run(post_and_drop(server.url, 5))
    assert all(post.cancelled() for post in posts), "a request was answered before its client left"
    after = wait_until_idle(server.url, timeout=60)
    assert_nothing_runs(after)
    # None had finished when its client left; run to its end, one would take MAX_TOKENS - 1 steps.
    assert decode_steps(after) - decode_steps(before) < MAX_TOKENS - 1, "dropped requests kept decoding"
    key = (("endpoint", "/v1/chat/completions"), ("status", "499"))
    assert after["epd_http_requests_total"][key] - before["epd_http_requests_total"].get(key, 0) == 5
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200

"""Hostile input: hundreds of malformed requests get 4xx with an error body, never a 5xx,
and the server (every instance, every cache) is as good as new afterwards."""

from __future__ import annotations

import asyncio
import json
import re
import socket

import httpx

from .conftest import API_KEY, MODEL_NAME
from .helpers import ServerProcess, image_message, metrics, wait_until_idle
from .hostile import CHAT, COMPLETIONS, Case, base_chat, base_completion, hostile_cases, mutations

SEED = 20240611
CONCURRENCY = 8


async def send_all(url: str, cases: list[Case]) -> list[tuple[int, bytes]]:
    limit = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:

        async def send(case: Case) -> tuple[int, bytes]:
            headers = {"Content-Type": "application/json", **case.headers}
            if case.auth:
                headers["Authorization"] = f"Bearer {API_KEY}"
            async with limit:
                content = case.content() if case.body is not None else None
                resp = await http.request(case.method, case.path, content=content, headers=headers)
                return resp.status_code, resp.content

        return await asyncio.gather(*(send(c) for c in cases))


def problem(case: Case, status: int, body: bytes) -> str | None:
    if status >= 500:
        return f"server error {status}: {body[:300]!r}"
    if case.expect and status != case.expect:
        return f"expected {case.expect}, got {status}: {body[:300]!r}"
    if status == 200:
        return "error event in a 200 stream" if b'data: {"error"' in body else None
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} without an OpenAI error body: {body[:300]!r}"
    if not (isinstance(error.get("message"), str) and error["message"] and "type" in error):
        return f"malformed error body {error}"
    if not {"param", "code"} <= error.keys():
        return f"error body lacks param/code: {error}"
    return None


def test_fuzz_hostile_requests(server: ServerProcess, media_dir):
    image = image_message("hi", 3, size=(40, 40))[0]["content"][0]["image_url"]["url"]
    chat = base_chat(MODEL_NAME, image)
    streaming = {**base_chat(MODEL_NAME, image), "stream": True, "logprobs": True, "top_logprobs": 2}
    bases = [(CHAT, chat), (CHAT, streaming), (COMPLETIONS, base_completion(MODEL_NAME))]
    cases = hostile_cases(MODEL_NAME, str(media_dir)) + mutations(bases, 420, SEED)
    assert len(cases) >= 500
    before = server_errors(metrics(server.url))

    results = asyncio.run(send_all(server.url, cases))

    failures = [f"{c.name}: {p}" for c, (s, b) in zip(cases, results) if (p := problem(c, s, b))]
    assert not failures, f"{len(failures)} bad answers:\n" + "\n".join(failures[:40])
    statuses = [s for s, _ in results]
    assert statuses.count(200) > 20, "the mutations should leave some requests valid"
    assert_server_recovered(server, before)


def server_errors(m: dict) -> dict:
    """5xx answers so far, by endpoint and status (other tests may have provoked some on purpose)."""
    return {k: v for k, v in m["epd_http_requests_total"].items() if dict(k)["status"].startswith("5")}


def assert_server_recovered(server: ServerProcess, errors_before: dict) -> None:
    resp = httpx.post(
        server.url + CHAT,
        json={**base_chat(MODEL_NAME, "data:,"), "messages": image_message("ok", 1)},
        headers=server.headers(),
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    m = wait_until_idle(server.url)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert all(v == 1 for v in m["epd_instance_up"].values()) and len(m["epd_instance_up"]) == 3
    errors = {k: v - errors_before.get(k, 0) for k, v in server_errors(m).items()}
    assert not any(errors.values()), errors


def raw_request(server: ServerProcess, head: str, body_chunks: list[bytes]) -> bytes:
    """Send a request by hand (httpx would not let us lie about the body); return the response."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except OSError:  # the server answered and closed: what we wanted
                break
        answer = b""
        while not _complete(answer) and (chunk := sock.recv(65536)):
            answer += chunk
        return answer


def _complete(response: bytes) -> bool:
    head, sep, body = response.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: (\d+)", head)
    return bool(sep and length and len(body) >= int(length.group(1)))


def test_request_body_limits(server: ServerProcess):
    auth = f"Authorization: Bearer {API_KEY}\r\n"
    declared = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {9 << 20}\r\n\r\n"
    assert raw_request(server, declared, []).startswith(b"HTTP/1.1 413")
    chunked = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    answer = raw_request(server, chunked, [chunk] * 12)
    assert answer.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in answer
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200

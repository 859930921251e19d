"""Bodies built to be expensive: refused by the cheap limits (epd.server.shape, text_bound,
body) before any tokenizing or validation work, and the server unharmed afterwards."""

from __future__ import annotations

import json
import socket

import httpx

from .conftest import API_KEY, MODEL_NAME
from .helpers import ServerProcess, gauge, raw_connection, read_response, wait_for_metrics, wait_until_idle

CHAT = "/v1/chat/completions"
MAX_REQUEST_BYTES = 8 << 20  # the main server's --max-request-bytes (conftest)
BUDGET = 4 * MAX_REQUEST_BYTES  # its --max-buffered-request-bytes: the default, 4 bodies


def post(server: ServerProcess, path: str, body: bytes) -> httpx.Response:
    headers = {**server.headers(), "Content-Type": "application/json"}
    return httpx.post(server.url + path, content=body, headers=headers, timeout=120)


def error_of(resp: httpx.Response) -> dict:
    assert resp.status_code == 400, resp.text[:300]
    return resp.json()["error"]


def test_a_prompt_too_long_to_fit_is_refused_before_tokenizing(server: ServerProcess):
    text = "word " * 1_500_000  # 7.5 MB: tokenizing it held the GIL for seconds
    chat = {"model": MODEL_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": text}]}
    error = error_of(post(server, CHAT, json.dumps(chat).encode()))
    assert "characters cannot fit" in error["message"] and error["param"] == "messages"
    completion = {"model": MODEL_NAME, "max_tokens": 2, "prompt": text}
    error = error_of(post(server, "/v1/completions", json.dumps(completion).encode()))
    assert "characters cannot fit" in error["message"] and error["param"] == "prompt"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_counts_that_make_validation_slow_are_refused_first(server: ServerProcess):
    message = {"role": "user", "content": "w"}
    many = json.dumps({"model": MODEL_NAME, "messages": [message] * 100_000}).encode()
    assert error_of(post(server, CHAT, many))["message"] == "messages: at most 2048 messages per request"
    # 1M integers where messages belong: pydantic built an error object for each.
    ints = b'{"messages": [' + b",".join([b"5"] * 1_000_000) + b"]}"
    assert "at most 2048 messages" in error_of(post(server, CHAT, ints))["message"]
    parts = [{"type": "text", "text": "w"}] * 5000
    body = json.dumps({"messages": [{"role": "user", "content": parts}]}).encode()
    assert "at most 4096 content parts" in error_of(post(server, CHAT, body))["message"]
    ids = json.dumps({"model": MODEL_NAME, "prompt": [7] * 1_000_000}).encode()
    assert "token ids cannot fit" in error_of(post(server, "/v1/completions", ids))["message"]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def send_body_part(server: ServerProcess, declared: int, part: int) -> socket.socket:
    sock = raw_connection(server.url)
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
    sock.sendall(f"{head}Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n".encode())
    sock.sendall(b" " * part)
    return sock


def buffered(m: dict) -> float:
    return gauge(m, "epd_request_body_bytes_buffered")


def test_bodies_being_received_are_bounded_in_bytes(server: ServerProcess):
    """Four uploads stop just short of their end; a fifth that would pass the budget gets 503."""
    part = MAX_REQUEST_BYTES - (64 << 10)
    holders = [send_body_part(server, MAX_REQUEST_BYTES, part) for _ in range(4)]
    try:
        wait_for_metrics(server.url, lambda m: buffered(m) == 4 * part, what="four bodies buffered")
        late = send_body_part(server, MAX_REQUEST_BYTES, 1 << 20)  # more than the budget has left
        status, headers, body = read_response(late)
        late.close()
        assert status == 503 and int(headers["retry-after"]) >= 1, body
        error = json.loads(body)["error"]
        assert error["code"] == "service_unavailable" and "too many request bodies" in error["message"]
        assert buffered(wait_for_metrics(server.url, lambda m: buffered(m) == 4 * part)) <= BUDGET
    finally:
        for sock in holders:
            sock.close()  # clients gone: their bytes return to the budget
    wait_for_metrics(server.url, lambda m: buffered(m) == 0, what="no body buffered")
    ok = {"model": MODEL_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "budget free"}]}
    assert post(server, CHAT, json.dumps(ok).encode()).status_code == 200
    wait_until_idle(server.url)

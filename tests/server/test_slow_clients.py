"""Clients that stop sending: headers or body not coming get a 408 and the connection closes.

The server's timeouts are set far below the client's, so each test waits for the server's
answer, whatever the machine's speed.
"""

from __future__ import annotations

import json

import httpx
import pytest

from .helpers import ServerProcess, gauge, metrics, raw_connection, read_response, wait_for_metrics

NAME = "tiny-slow"
TIMEOUT_S = 0.5  # the server's header and body read timeouts
CLIENT_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def slow_server(model: str, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    log = tmp_path_factory.mktemp("logs") / "slow_server.log"
    args = ["--model", model, "--served-model-name", NAME, "--layout", "1EPD"]
    args += ["--header-read-timeout", str(TIMEOUT_S), "--body-read-timeout", str(TIMEOUT_S)]
    srv = ServerProcess(args, log).start()
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def answer_to(server: ServerProcess, sent: bytes) -> tuple[int, dict, bytes]:
    """Send `sent`, then nothing: the server's answer, and that it closed the connection after."""
    with raw_connection(server.url, CLIENT_TIMEOUT_S) as sock:
        sock.sendall(sent)
        status, headers, body = read_response(sock)
        assert sock.recv(1) == b"", "the connection stayed open"
    return status, headers, body


def timeout_error(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty"],
    ids=["nothing", "partial headers"],
)
def test_headers_not_received_in_time_get_408(slow_server: ServerProcess, sent: bytes):
    other = (("endpoint", "other"), ("status", "408"))
    before = metrics(slow_server.url)["epd_http_requests_total"].get(other, 0)
    status, _, body = answer_to(slow_server, sent)
    assert status == 408
    assert "headers were not received" in timeout_error(body)["message"]
    assert metrics(slow_server.url)["epd_http_requests_total"][other] == before + 1


def test_a_stalled_body_gets_408_and_frees_its_bytes(slow_server: ServerProcess):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    status, headers, body = answer_to(slow_server, head + b"Content-Length: 1000\r\n\r\n" + b'{"mess')
    assert status == 408 and headers["connection"] == "close"
    assert "body stalled" in timeout_error(body)["message"]
    wait_for_metrics(slow_server.url, lambda m: gauge(m, "epd_request_body_bytes_buffered") == 0)
    ok = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    resp = httpx.post(slow_server.url + "/v1/chat/completions", json=ok, timeout=CLIENT_TIMEOUT_S)
    assert resp.status_code == 200


def test_a_kept_alive_connection_times_out_on_its_next_request_only(slow_server: ServerProcess):
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with raw_connection(slow_server.url, CLIENT_TIMEOUT_S) as sock:
        sock.sendall(request)
        assert read_response(sock)[0] == 200
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # the next request, cut short
        status, _, body = read_response(sock)
    assert status == 408
    timeout_error(body)

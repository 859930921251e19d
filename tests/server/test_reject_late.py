"""--reject-late on a real `epd serve` (1EPD): a request that cannot meet its TTFT deadline even if
served next is refused at once with a 429 and a Retry-After, counted in /metrics, while the others
are served. The late one asks for its first token within 1 ns of arriving: whatever the machine,
its deadline has passed by the time the scheduler sees it."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import MODEL_NAME
from .helpers import ServerProcess

API_KEY = "sk-reject-late"


@pytest.fixture(scope="module")
def server(model: str, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    log = tmp_path_factory.mktemp("logs") / "reject_late.log"
    args = ["--model", model, "--served-model-name", MODEL_NAME, "--layout", "1EPD"]
    args += ["--scheduling-policy", "slo", "--reject-late", "--num-kv-blocks", "512"]
    srv = ServerProcess(args, log, api_key=API_KEY).start()
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def post(server: ServerProcess, **fields) -> httpx.Response:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}
    url = server.url + "/v1/chat/completions"
    return httpx.post(url, headers=server.headers(), json=body, timeout=120)


def test_a_late_request_gets_429_with_retry_after_while_others_are_served(server):
    with ThreadPoolExecutor(4) as pool:
        served = [pool.submit(post, server, slo_ttft=60.0), pool.submit(post, server)]
        late = post(server, slo_ttft=1e-9)
        stream = post(server, slo_ttft=1e-9, stream=True)
        answers = [f.result() for f in served]
    for refused in (late, stream):
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "deadline_unmeetable"
        assert "TTFT deadline" in error["message"]
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert all(a.json()["choices"][0]["message"]["content"] is not None for a in answers)

    metrics = httpx.get(server.url + "/metrics", headers=server.headers(), timeout=30).text
    assert re.search(r"^epd_requests_rejected_late_total 2\.0$", metrics, re.M), metrics
    assert re.search(r'^epd_instance_rejected_late_total\{instance="EPD0"\} 2\.0$', metrics, re.M)

"""--reject-late through the disaggregated path (1E+1P+1D, real instance processes): a request with
an image whose TTFT deadline cannot be met is encoded on E, refused by P's scheduler and answered
429 with a Retry-After by the router, while the others are served end to end; the refused ones
leave nothing pinned (embeddings, KV) and the server keeps serving.

The late ones ask for their first token within 1 ns of arriving: whatever the machine, the
deadline has passed by the time P's scheduler sees them (test_reject_late.py covers 1EPD)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import MODEL_NAME
from .helpers import ServerProcess, gauge, image_message, wait_until_idle

API_KEY = "sk-reject-late-cluster"


@pytest.fixture(scope="module")
def server(model: str, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    log = tmp_path_factory.mktemp("logs") / "reject_late_cluster.log"
    args = ["--model", model, "--served-model-name", MODEL_NAME, "--layout", "1E+1P+1D", "--reject-late"]
    args += ["--scheduling-policy", "slo", "--num-kv-blocks", "512", "--max-model-len", "1024"]
    srv = ServerProcess(args, log, api_key=API_KEY).start()
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def post(server: ServerProcess, seed: int, **fields) -> httpx.Response:
    body = {"model": MODEL_NAME, "messages": image_message("what shape?", seed), "max_tokens": 4, **fields}
    url = server.url + "/v1/chat/completions"
    return httpx.post(url, headers=server.headers(), json=body, timeout=120)


def assert_refused_as_late(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "deadline_unmeetable"
    assert "TTFT deadline" in error["message"]


def test_late_requests_get_429_from_the_prefill_instance_while_others_are_served(server):
    with ThreadPoolExecutor(4) as pool:
        served = [pool.submit(post, server, 1, slo_ttft=60.0), pool.submit(post, server, 2)]
        late = post(server, 3, slo_ttft=1e-9)
        stream = post(server, 4, slo_ttft=1e-9, stream=True)
        answers = [f.result() for f in served]
    for refused in (late, stream):
        assert_refused_as_late(refused)
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert all(a.json()["usage"]["completion_tokens"] >= 1 for a in answers)

    m = wait_until_idle(server.url)  # nothing left pinned on E, P or D by the refused ones
    assert gauge(m, "epd_requests_rejected_late_total") == 2
    assert gauge(m, "epd_instance_rejected_late_total", instance="P0") == 2  # P refused them
    assert gauge(m, "epd_instance_rejected_late_total", instance="D0") == 0
    # The late ones were encoded too: P's scheduler sees a request once its embeddings are in.
    assert gauge(m, "epd_instance_images_encoded_total", instance="E0") == 4

    again = post(server, 5, slo_ttft=60.0)  # the refusals left the cluster serving
    assert again.status_code == 200, again.text

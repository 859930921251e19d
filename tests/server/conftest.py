"""One `epd serve` (1E+1P+1D, real instance processes) shared by the tests/server session.

Its teardown is a test too: SIGTERM must drain, exit 0 and leave no child process behind.
"""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from epd.testing.images import noise_image

from .helpers import ServerProcess, alive

API_KEY = "sk-test-epd"
MODEL_NAME = "epd-tiny"
MAIN_ARGS = ["--layout", "1E+1P+1D", "--max-model-len", "1024", "--num-kv-blocks", "2048"]
# Small limits, so the fuzz test reaches each of them with small requests.
LIMIT_ARGS = ["--max-image-bytes", "2MiB", "--max-image-pixels", "4000000", "--max-images-per-request", "8"]
LIMIT_ARGS += ["--max-request-bytes", "8MiB"]


@pytest.fixture(scope="session")
def model(checkpoints: dict[str, Path]) -> str:
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The --allowed-local-media-path of the main server, holding one PNG."""
    root = tmp_path_factory.mktemp("media")
    noise_image(80, 60, seed=7).save(root / "allowed.png")
    return root


@pytest.fixture(scope="session")
def server(model: str, media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    log = tmp_path_factory.mktemp("logs") / "main_server.log"
    args = ["--model", model, "--served-model-name", MODEL_NAME, *MAIN_ARGS, *LIMIT_ARGS]
    args += ["--allowed-local-media-path", str(media_dir)]
    srv = ServerProcess(args, log, api_key=API_KEY).start()
    children = srv.descendants()
    assert len(children) >= 3, "expected one process per instance"
    yield srv
    code = srv.stop()
    deadline = time.monotonic() + 15
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert code == 0, srv.log()[-3000:]
    assert not alive(children), f"left behind: {alive(children)}"


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, timeout=120, max_retries=0)

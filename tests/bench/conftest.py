"""One tiny-model `epd serve` (1EPD) shared by the tests/bench session, started through the
benchmark's own launcher (the one `epd bench sweep` uses)."""

from __future__ import annotations

from pathlib import Path

import pytest

from epd.bench.serve.launcher import LocalServer

MODEL_NAME = "epd-tiny"
SERVE_ARGS = ["--max-model-len", "1024", "--num-kv-blocks", "1024", "--served-model-name", MODEL_NAME]


@pytest.fixture(scope="session")
def model(checkpoints: dict[str, Path]) -> str:
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="session")
def server(model: str, tmp_path_factory: pytest.TempPathFactory) -> LocalServer:
    log = tmp_path_factory.mktemp("logs") / "bench_server.log"
    with LocalServer(["--model", model, "--layout", "1EPD", *SERVE_ARGS], log, start_timeout=180) as srv:
        yield srv
    assert srv.proc is not None and srv.proc.returncode == 0, srv.log()[-3000:]

"""`epd serve --model ORG/NAME` from a Hub cache laid out here (offline): served under that name,
every instance process reading the one snapshot; a missing model fails in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from .helpers import ServerProcess

COMMIT = "c" * 40


def hub_cache(root: Path, repo_id: str, checkpoint: Path) -> Path:
    """huggingface_hub's layout: models--ORG--NAME/{refs/main, snapshots/<commit>/<links>}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in checkpoint.iterdir():
        (snapshot / file.name).symlink_to(file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root


@pytest.fixture
def offline_cache(tmp_path, checkpoints, monkeypatch) -> Path:
    """The server processes inherit this environment."""
    cache = hub_cache(tmp_path / "hub", "org/tiny", checkpoints["qwen2_5_vl"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_serve_a_hub_id_under_the_name_given(offline_cache, tmp_path):
    args = ["--model", "org/tiny", "--layout", "1E+1P+1D", "--max-model-len", "512", "--num-kv-blocks", "256"]
    server = ServerProcess(args, tmp_path / "hub.log").start()
    try:
        listed = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in listed] == ["org/tiny"]
        assert listed[0]["root"] == str(offline_cache / "models--org--tiny" / "snapshots" / COMMIT)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=120, max_retries=0)
        reply = client.chat.completions.create(
            model="org/tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        assert reply.model == "org/tiny" and reply.choices[0].message.content is not None
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def test_serve_a_missing_hub_id_fails_in_one_line(offline_cache):
    result = subprocess.run(
        [sys.executable, "-m", "epd.cli", "serve", "--model", "org/missing", "--revision", "v9"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert "'org/missing'" in line and str(offline_cache) in line and "'v9'" in line
    assert "HF_HUB_OFFLINE" in line

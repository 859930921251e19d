"""The `epd` command line: help, options, defaults in step with EngineArgs, start-up errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from epd.cli import build_parser, parse_bytes
from epd.demo import SAMPLES_DIR
from epd.entrypoints.async_engine import EngineArgs

from .helpers import ServerProcess

REPO = Path(__file__).resolve().parents[2]

OPTIONS = [
    "--model", "--layout", "--devices", "--device", "--transfer", "--host", "--port", "--api-key",
    "--served-model-name", "--max-images-per-request", "--max-image-pixels", "--max-image-bytes",
    "--max-request-bytes", "--allowed-local-media-path", "--allow-remote-media", "--max-queued-requests",
    "--max-model-len", "--block-size", "--num-kv-blocks", "--kv-cache-memory-bytes", "--mm-cache-bytes",
    "--max-num-seqs", "--max-num-batched-tokens", "--dtype", "--load-format", "--seed", "--shutdown-timeout",
    "--header-read-timeout", "--body-read-timeout", "--max-buffered-request-bytes",
]  # fmt: skip


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "epd.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_subcommands_and_every_serve_option():
    top = run_cli("--help")
    assert top.returncode == 0 and "serve" in top.stdout
    serve = run_cli("serve", "--help")
    assert serve.returncode == 0
    for option in OPTIONS:
        assert option in serve.stdout, option
    assert "EPD_API_KEY" in serve.stdout


def test_serve_without_model_serves_the_demo_model(tmp_path):
    """The README's first command: `epd serve` alone, then the example request on a shipped
    sample image gets the sample's true answer."""
    answers = json.loads((SAMPLES_DIR / "answers.json").read_text())["images"]
    server = ServerProcess([], tmp_path / "demo.log").start()
    try:
        for sample in answers:
            result = subprocess.run(
                [
                    sys.executable,
                    "examples/ask_demo.py",
                    "--url",
                    server.url,
                    "--image",
                    str(SAMPLES_DIR / sample["file"]),
                ],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=REPO,
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == sample["answer"]
    finally:
        server.stop()


def test_defaults_match_engine_args():
    args = build_parser().parse_args(["serve", "--model", "m"])
    defaults = {f.name: f.default for f in dataclasses.fields(EngineArgs)}
    shared = [
        "layout",
        "device",
        "devices",
        "transfer",
        "dtype",
        "load_format",
        "max_model_len",
        "block_size",
    ]
    shared += ["num_kv_blocks", "kv_cache_memory_bytes", "mm_cache_bytes", "max_num_seqs", "seed"]
    for name in [*shared, "max_num_batched_tokens"]:
        assert getattr(args, name) == defaults[name], name
    assert (not args.disable_prefix_caching) == defaults["enable_prefix_caching"]
    assert args.host == "127.0.0.1" and args.port == 8000 and not args.allow_remote_media


@pytest.mark.parametrize(
    "text, value", [("1024", 1024), ("2MiB", 2 << 20), ("1g", 1 << 30), ("512 KB", 512 << 10)]
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_inconsistent_limits_are_refused_before_starting(checkpoints):
    model = str(checkpoints["qwen2_5_vl"])
    result = run_cli(
        "serve", "--model", model, "--max-request-bytes", "2MiB", "--max-buffered-request-bytes", "1MiB"
    )
    assert result.returncode == 2
    assert "max_buffered_request_bytes" in result.stderr and "Traceback" not in result.stderr


def test_bad_layout_fails_fast_without_a_traceback(checkpoints):
    result = run_cli("serve", "--model", str(checkpoints["qwen2_5_vl"]), "--layout", "1X+1D")
    assert result.returncode == 2
    assert "cannot start" in result.stderr and "Traceback" not in result.stderr

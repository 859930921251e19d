"""GPU-only tests: skipped where no CUDA device is present (CI).

Registers the `gpu` marker here so that `pytest -m gpu` selects them without a change to
pyproject.toml.
"""

from __future__ import annotations

import dataclasses

import pytest

from epd.entrypoints.async_engine import EngineArgs


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


@pytest.fixture
def engines_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every engine `LLM(...)` builds runs on cuda:0 with the automatic attention backend
    (Triton kernels, CUDA graphs for decode), whatever the test passes."""
    original = EngineArgs.engine_config

    def engine_config(self: EngineArgs):
        return dataclasses.replace(original(self), device="cuda", attention_backend="auto")

    monkeypatch.setattr(EngineArgs, "engine_config", engine_config)

"""GPU-only tests: skipped where no CUDA device is present (CI).

Registers the `gpu` marker here so that `pytest -m gpu` selects them without a change to
pyproject.toml.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from epd.entrypoints.async_engine import EngineArgs


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


@pytest.fixture(autouse=True)
def _current_device_restored():
    """Each test leaves this process's current CUDA device as it found it. A connector on a second
    device makes that device its thread's current one (an instance serves one device); left so,
    every later test in the process launched its Triton kernels and captured its graphs on
    cuda:1 with tensors on cuda:0 (83 failures on a two-GPU host, none on one)."""
    if not torch.cuda.is_available():
        yield
        return
    device = torch.cuda.current_device()
    yield
    torch.cuda.set_device(device)


@pytest.fixture
def engines_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every engine `LLM(...)` builds runs on cuda:0 with the automatic attention backend
    (Triton kernels, CUDA graphs for decode), whatever the test passes."""
    original = EngineArgs.engine_config

    def engine_config(self: EngineArgs):
        return dataclasses.replace(original(self), device="cuda", attention_backend="auto")

    monkeypatch.setattr(EngineArgs, "engine_config", engine_config)

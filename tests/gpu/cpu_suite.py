"""A CPU test module run again on the GPU: its tests, imported into a tests/gpu module, run with
every engine `LLM(...)` builds on cuda:0 (the `engines_on_cuda` fixture of conftest.py), with the
same bar as on the CPU (transformers' tokens and logprobs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

ON_CUDA = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("engines_on_cuda"),
]


def load_suite(path_in_tests: str) -> ModuleType:
    """The module at tests/`path_in_tests`, loaded under a name of its own (not collected twice)."""
    path = Path(__file__).parents[1] / path_in_tests
    spec = importlib.util.spec_from_file_location(f"_{path.stem}_suite", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def collected_from(suite: ModuleType) -> dict[str, object]:
    """Its test functions, by name: what a module puts in its globals to run them."""
    return {name: getattr(suite, name) for name in dir(suite) if name.startswith("test_")}

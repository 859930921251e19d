"""The token-equivalence suite of tests/entrypoints/test_llm_vs_hf.py, with epd on the GPU.

Same tests, same bar (identical greedy tokens, logprobs within 1e-4 of transformers on the
CPU, fp32), but every engine runs on CUDA with the Triton attention backend and CUDA-graph
decode steps. Prefix-cache hits, preemption and mixed batches go through the GPU kernels.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("engines_on_cuda"),
]


def _load_suite():
    path = Path(__file__).parents[1] / "entrypoints" / "test_llm_vs_hf.py"
    spec = importlib.util.spec_from_file_location("_llm_vs_hf_suite", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_suite = _load_suite()
hf = _suite.hf  # the fixture
globals().update({name: getattr(_suite, name) for name in dir(_suite) if name.startswith("test_")})

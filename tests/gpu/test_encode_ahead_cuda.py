"""The encode-ahead suite of tests/engine/test_encode_ahead.py, with the engine on the GPU.

Same tests, same bar (transformers' tokens and logprobs on the CPU, fp32), but the images are
encoded on the encode-ahead thread's own CUDA stream while the engine's steps run on theirs:
the hand-over between the streams (events, no device-wide synchronise) is what this adds.
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
    path = Path(__file__).parents[1] / "engine" / "test_encode_ahead.py"
    spec = importlib.util.spec_from_file_location("_encode_ahead_suite", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_suite = _load_suite()
hf = _suite.hf  # the fixture
globals().update({name: getattr(_suite, name) for name in dir(_suite) if name.startswith("test_")})

"""The encode-ahead suite of tests/engine/test_encode_ahead.py, with the engine on the GPU.

Same tests, same bar (transformers' tokens and logprobs on the CPU, fp32), but the images are
encoded on the encode-ahead thread's own CUDA stream while the engine's steps run on theirs:
the hand-over between the streams (events, no device-wide synchronise) is what this adds.
"""

from __future__ import annotations

from tests.gpu.cpu_suite import ON_CUDA, collected_from, load_suite

pytestmark = ON_CUDA

_suite = load_suite("engine/test_encode_ahead.py")
hf = _suite.hf  # the fixture
globals().update(collected_from(_suite))

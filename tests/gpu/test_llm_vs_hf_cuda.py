"""The token-equivalence suite of tests/entrypoints/test_llm_vs_hf.py, with epd on the GPU.

Same tests, same bar (identical greedy tokens, logprobs within 1e-4 of transformers on the
CPU, fp32), but every engine runs on CUDA with the Triton attention backend and CUDA-graph
decode steps. Prefix-cache hits, preemption and mixed batches go through the GPU kernels.
"""

from __future__ import annotations

from tests.gpu.cpu_suite import ON_CUDA, collected_from, load_suite

pytestmark = ON_CUDA

_suite = load_suite("entrypoints/test_llm_vs_hf.py")
hf = _suite.hf  # the fixture
globals().update(collected_from(_suite))

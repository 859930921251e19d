"""Async scheduling on a CUDA device (skipped without one): decode steps replayed from CUDA graphs
take their token ids from the device (`DecodeGraphs.run`'s `device_token_ids`), the tokens come back
through pinned memory and an event; eager steps take them too. Outputs as the synchronous engine's.

    pytest tests/engine/test_async_scheduling_cuda.py -q          # on a machine with a GPU
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from async_runs import both, overlapped_steps, prompt, run_random_mix

from epd import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# float32 weights; a wasted row may move a batch to another graph size, whose kernels round differently.
TOLERANCE = 1e-4


@pytest.fixture(params=[True, False], ids=["graphs", "eager"])
def cuda_setup(setup, request):
    config, processor = setup
    config = replace(config, device="cuda", attention_backend="auto", cuda_graphs=request.param)
    return config, processor


def test_decodes_of_shrinking_batches_give_the_sync_outputs(cuda_setup):
    """13 requests ending at different steps, so the batch passes through several graph sizes."""
    requests = {
        f"r{i}": (
            prompt(i, 9 + 3 * i),
            SamplingParams(temperature=0, max_tokens=4 + 2 * i, logprobs=2, ignore_eos=True),
        )
        for i in range(13)
    }
    requests["seeded"] = (prompt(50, 17), SamplingParams(temperature=0.8, seed=3, max_tokens=30, logprobs=1))
    requests["eos"] = (prompt(60, 12), SamplingParams(temperature=0, max_tokens=30))
    _, _, engine = both(cuda_setup, requests, exact=False, tolerance=TOLERANCE, max_num_seqs=16)
    assert overlapped_steps(engine) > 0
    assert (engine.runner.graphs is not None) == cuda_setup[0].cuda_graphs


@pytest.mark.parametrize("seed", range(4))
def test_random_mixes_give_the_sync_outputs(cuda_setup, seed):
    run_random_mix(cuda_setup, seed, tolerance=TOLERANCE)

"""epd.models.layers.linear.patch_projection: on the CPU each patch's embedding is the same bytes
whatever batch it comes in (what splitting images and video frames across encoders relies on),
and the same numbers as one matmul."""

from __future__ import annotations

import torch

from epd.models.layers.linear import CPU_ROW_BLOCK, patch_projection


def test_each_rows_result_is_the_same_in_any_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    # Qwen2-VL's patch: 3 channels x 2 frames x 14 x 14 pixels. Plain matmuls of 480 and 192
    # rows disagreed in the sixth digit on an AVX-512 Xeon.
    patches = torch.randn(480, 1176, generator=gen)
    weight, bias = torch.randn(32, 1176, generator=gen), torch.randn(32, generator=gen)
    for b in (bias, None):
        whole = patch_projection(patches, weight, b)
        for start, stop in [(0, 192), (192, 480), (5, 6), (100, 100 + CPU_ROW_BLOCK + 1), (0, 0)]:
            assert torch.equal(patch_projection(patches[start:stop], weight, b), whole[start:stop])
        matmul = patches @ weight.t() if b is None else torch.addmm(b, patches, weight.t())
        torch.testing.assert_close(whole, matmul, rtol=1e-5, atol=1e-4)

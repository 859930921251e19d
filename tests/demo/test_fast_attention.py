"""The training-time padded vision attention equals transformers' per-window loop."""

from __future__ import annotations

import torch

from epd.demo.checkpoint import SIZES, hf_config
from epd.demo.fast_attention import fast_vision_attention

IDS = {
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "vision_start_token_id": 2,
    "vision_end_token_id": 3,
    "vision_token_id": 4,
    "image_token_id": 5,
    "video_token_id": 6,
}


def test_padded_attention_matches_forward_and_gradients():
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(hf_config(SIZES["tiny"], IDS)).train()
    visual = model.model.visual
    # Images of different sizes: several windows each, and windows of different lengths.
    grids = torch.tensor([[1, 8, 8], [1, 16, 12], [1, 10, 14]])
    pixels = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        visual.zero_grad()
        out = visual(pixels, grid_thw=grids).pooler_output
        out.square().sum().backward()
        return out.detach(), visual.patch_embed.proj.weight.grad.clone()

    want_out, want_grad = run()
    with fast_vision_attention(model) as patched:
        got_out, got_grad = run()
    assert patched == SIZES["tiny"].vision_depth
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)
    # Restored on exit.
    torch.testing.assert_close(run()[0], want_out, rtol=0, atol=0)

"""Our vision tower against transformers' on the same weights, images packed in one batch."""

from __future__ import annotations

import pytest
import torch

from epd.models.loader import build_model
from epd.models.qwen2_vl import VISION
from epd.testing.reference import load_hf_model

# Different sizes, non-square, and one larger than a Qwen2.5 window in both directions.
GRIDS = [(1, 8, 12), (1, 4, 4), (1, 14, 6), (1, 2, 20)]


@torch.no_grad()
def test_encode_images_matches_transformers(checkpoint):
    ours = build_model(checkpoint, parts=frozenset({VISION}))
    hf = load_hf_model(checkpoint)
    patches = torch.randn(sum(t * h * w for t, h, w in GRIDS), ours.config.vision.patch_dim)
    expected = hf.model.get_image_features(patches, torch.tensor(GRIDS)).pooler_output
    got = ours.encode_images(patches, GRIDS)
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_packing_does_not_mix_images(checkpoint):
    """An image encodes to the same embedding alone or packed with others."""
    ours = build_model(checkpoint, parts=frozenset({VISION}))
    sizes = [t * h * w for t, h, w in GRIDS]
    patches = torch.randn(sum(sizes), ours.config.vision.patch_dim)
    packed = ours.encode_images(patches, GRIDS)
    for i, single in enumerate(patches.split(sizes)):
        alone = ours.encode_images(single, [GRIDS[i]])[0]
        torch.testing.assert_close(packed[i], alone, atol=1e-5, rtol=1e-5)


def test_vision_only_instance_has_no_llm_weights(checkpoint):
    model = build_model(checkpoint, parts=frozenset({VISION}))
    names = [n for n, _ in model.named_parameters()]
    assert names and all(n.startswith("visual.") for n in names)
    with pytest.raises(RuntimeError, match="no language-model weights"):
        model.embed_tokens(torch.tensor([1, 2]))

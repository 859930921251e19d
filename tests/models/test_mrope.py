"""M-RoPE positions against transformers' get_rope_index."""

from __future__ import annotations

import random

import torch

from epd.models.mrope import decode_positions, mrope_positions
from epd.testing.reference import load_hf_model


def _layout(rng: random.Random, image_token: int, merge: int):
    """Random prompt: text runs and images of random grids, in random order."""
    ids, spans, grids = [], [], []
    for _ in range(rng.randint(0, 4)):
        # At least one text token between images, as <|vision_start|>/<|vision_end|> guarantee.
        ids += [rng.randint(0, 50) for _ in range(rng.randint(1, 7))]
        grid = (1, merge * rng.randint(1, 6), merge * rng.randint(1, 6))
        n = grid[1] * grid[2] // merge**2
        spans.append((len(ids), n))
        grids.append(grid)
        ids += [image_token] * n
    ids += [rng.randint(0, 50) for _ in range(rng.randint(1, 7))]
    return ids, spans, grids


def test_positions_match_get_rope_index(checkpoint):
    hf = load_hf_model(checkpoint)
    image_token, merge = hf.config.image_token_id, hf.config.vision_config.spatial_merge_size
    rng = random.Random(0)
    for _ in range(30):
        ids, spans, grids = _layout(rng, image_token, merge)
        ours, delta = mrope_positions(len(ids), spans, grids, merge)
        if not grids:
            assert delta == 0 and torch.equal(ours, torch.arange(len(ids)).expand(3, -1))
            continue
        t_ids = torch.tensor([ids])
        expected, expected_delta = hf.model.get_rope_index(
            t_ids, mm_token_type_ids=(t_ids == image_token).int(), image_grid_thw=torch.tensor(grids)
        )
        assert torch.equal(ours, expected[:, 0]), (spans, grids)
        assert delta == int(expected_delta)


def test_decode_continues_from_delta():
    positions, delta = mrope_positions(10, [(2, 6)], [(1, 4, 6)], 2)
    assert delta == int(positions.max()) + 1 - 10
    nxt = decode_positions(10, 3, delta)
    assert torch.equal(nxt, (torch.arange(10, 13) + delta).expand(3, -1))
    assert int(nxt[0, 0]) == int(positions.max()) + 1

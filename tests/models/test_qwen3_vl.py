"""Qwen3-VL's parts against transformers on the same weights: the vision tower with its deepstack
levels, the interleaved M-RoPE, image preprocessing, and the full-size config's shapes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoImageProcessor

from epd.bench.roofline_setup import BENCH_CONFIGS
from epd.inputs.image_processor import ImageProcessorConfig, process_image
from epd.models.config import VLModelConfig
from epd.models.loader import build_model
from epd.models.qwen2_vl import LANGUAGE, VISION
from epd.models.qwen3_vl import DeepstackInputs
from epd.testing.images import noise_image
from epd.testing.reference import load_hf_model

# Smaller and larger than the tiny checkpoint's 8 x 8 learned position grid, non-square both ways.
GRIDS = [(1, 8, 12), (1, 4, 4), (1, 14, 6), (1, 2, 20), (1, 16, 16)]
FULL_SIZE_CONFIG = BENCH_CONFIGS / "qwen3_vl_8b.json"
# Qwen/Qwen3-VL-8B-Instruct's preprocessor_config.json (also in epd/bench/configs).
REAL_PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "Qwen3VLProcessor",
}


@pytest.fixture(scope="module")
def hf(qwen3_checkpoint):
    return load_hf_model(qwen3_checkpoint)


@torch.no_grad()
def test_vision_tower_and_deepstack_match_transformers(qwen3_checkpoint, hf):
    ours = build_model(qwen3_checkpoint, parts=frozenset({VISION}))
    patches = torch.randn(sum(t * h * w for t, h, w in GRIDS), ours.config.vision.patch_dim)
    expected = hf.model.get_image_features(patches, torch.tensor(GRIDS))
    assert len(expected.deepstack_features) == 2
    got = ours.encode_images(patches, GRIDS)
    for i, g in enumerate(got):
        # The wire format: [main | level 0 | level 1], each the LLM's width.
        want = torch.cat([expected.pooler_output[i], *(level[i] for level in expected.deepstack_features)], 1)
        assert g.shape == want.shape == (want.shape[0], ours.config.mm_embed_width)
        torch.testing.assert_close(g, want, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_embed_tokens_splits_the_wire_format(qwen3_checkpoint):
    model = build_model(qwen3_checkpoint, parts=frozenset({LANGUAGE}))
    hidden, width = model.config.text.hidden_size, model.config.mm_embed_width
    ids = torch.tensor([1, 2, model.config.image_token_id, model.config.image_token_id, 3])
    rows = torch.randn(2, width)
    inputs = model.embed_tokens(ids, rows, torch.tensor([2, 3]))
    assert isinstance(inputs, DeepstackInputs)
    assert torch.equal(inputs.embeds[2:4], rows[:, :hidden])
    assert torch.equal(inputs.embeds[[0, 1, 4]], model.model.embed_tokens(ids[[0, 1, 4]]))
    assert torch.equal(inputs.levels[:, 1], rows[:, 2 * hidden :])
    assert isinstance(model.embed_tokens(ids), torch.Tensor)  # text only: a plain tensor
    with pytest.raises(ValueError, match="main \\+ deepstack"):
        model.embed_tokens(ids, rows[:, :hidden], torch.tensor([2, 3]))


def test_interleaved_mrope_matches_transformers(qwen3_checkpoint, hf):
    ours = build_model(qwen3_checkpoint, parts=frozenset({LANGUAGE}))
    positions = torch.randint(0, 300, (3, 50))
    cos, sin = ours.model.rotary_emb(positions, torch.float32)
    x = torch.zeros(1, 50, ours.config.text.hidden_size)
    want_cos, want_sin = hf.model.language_model.rotary_emb(x, positions[:, None, :])
    assert torch.equal(cos, want_cos[0]) and torch.equal(sin, want_sin[0])


SIZES = [(56, 56), (150, 100), (400, 120), (97, 311), (1000, 700), (33, 900), (640, 480)]


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_image_processing_is_bit_identical_to_transformers(tmp_path, qwen3_checkpoint, which):
    """16-pixel patches and mean = std = 0.5 read from preprocessor_config.json give exactly
    transformers' pixels (its PIL backend, the one installed here) and grids."""
    model_dir = qwen3_checkpoint
    if which == "real":
        model_dir = tmp_path
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(REAL_PREPROCESSOR))
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    cfg = ImageProcessorConfig.from_pretrained(model_dir)
    assert (cfg.patch_size, cfg.image_mean, cfg.image_std) == (16, (0.5,) * 3, (0.5,) * 3)
    reference = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    for width, height in SIZES:
        image = noise_image(width, height, seed=width + height)
        expected = reference(images=image, return_tensors="pt")
        got = process_image(image, cfg)
        assert got.grid_thw == tuple(expected["image_grid_thw"][0].tolist())
        assert torch.equal(got.pixel_values, expected["pixel_values"])


def test_full_size_config_has_transformers_shapes():
    """Qwen3-VL-8B's config builds the same parameters as transformers' (meta device: no memory)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from epd.models.qwen3_vl import Qwen3VLForConditionalGeneration as Ours

    raw = json.loads(FULL_SIZE_CONFIG.read_text())
    with torch.device("meta"):
        theirs = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**raw))
        ours = Ours(VLModelConfig.from_dict(raw))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    names = dict(ours.named_parameters())
    assert all(ours.map_weight_name(name)[0] in names for name, _ in theirs.named_parameters())
    config = ours.config
    assert config.text.head_dim == 128 and config.text.mrope_interleaved and config.text.qk_norm
    assert config.mm_embed_width == 4 * config.text.hidden_size  # main + 3 deepstack levels

"""process_image / smart_resize / ImageProcessorConfig against transformers' Qwen2VLImageProcessorPil."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from epd.inputs.errors import InvalidInputError
from epd.inputs.image import load_image
from epd.inputs.image_processor import (
    ImageProcessorConfig,
    expand_patches,
    image_grid_thw,
    normalization_table,
    process_image,
    smart_resize,
)

from .helpers import REAL_PREPROCESSOR, data_url, encode, random_image


def reference(image, **kwargs) -> tuple[torch.Tensor, tuple[int, int, int]]:
    out = Qwen2VLImageProcessorPil(**kwargs)(images=image, return_tensors="pt")
    return out["pixel_values"], tuple(out["image_grid_thw"][0].tolist())


SIZES = [  # (width, height): square, odd, non-square both ways, up to 400 px, rounding edge cases
    (56, 56),
    (57, 83),
    (100, 400),
    (400, 100),
    (224, 224),
    (333, 127),
    (399, 401),
    (70, 42),  # 70/28 = 2.5: round-half-even
    (5600, 28),  # aspect ratio exactly 200: allowed
    (29, 5750),  # just under 200, upscaled to min_pixels along the short side
]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_reference_exactly(size: tuple[int, int]) -> None:
    img = random_image(*size, seed=sum(size))
    expected, grid = reference(img)
    out = process_image(img, ImageProcessorConfig())
    assert out.grid_thw == grid
    assert out.pixel_values.dtype == torch.float32
    assert out.pixel_values.shape == expected.shape
    assert torch.equal(out.pixel_values, expected)


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P", "CMYK"])
def test_non_rgb_modes_match_reference(mode: str) -> None:
    img = random_image(131, 77, mode, seed=3)
    expected, grid = reference(img)
    for source in (img, load_image(img)):  # given directly, or first through load_image
        out = process_image(source, ImageProcessorConfig())
        assert out.grid_thw == grid and torch.equal(out.pixel_values, expected)


def test_downscale_branch_and_custom_config_match_reference() -> None:
    cfg = ImageProcessorConfig(
        min_pixels=8 * 28 * 28, max_pixels=64 * 28 * 28, image_mean=(0.5,) * 3, image_std=(0.5,) * 3
    )
    img = random_image(390, 260, seed=4)
    expected, grid = reference(
        img, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    out = process_image(img, cfg)
    assert out.grid_thw == grid
    assert out.num_patches <= 64 * 4
    assert torch.equal(out.pixel_values, expected)


def test_tiny_image_upscaled_like_reference() -> None:
    # Current transformers no longer rejects sides under the factor: it upscales to min_pixels.
    img = random_image(10, 10, seed=5)
    expected, grid = reference(img)
    out = process_image(img, ImageProcessorConfig())
    assert out.grid_thw == grid == (1, 4, 4)
    assert torch.equal(out.pixel_values, expected)


def test_from_data_url_and_hash() -> None:
    img = random_image(120, 90, seed=6)
    loaded = load_image(data_url(encode(img, "PNG"), "image/png"))
    a, b = process_image(img, ImageProcessorConfig()), process_image(loaded, ImageProcessorConfig())
    assert torch.equal(a.pixel_values, b.pixel_values) and a.content_hash == b.content_hash
    assert process_image(img, ImageProcessorConfig(), content_hash="given").content_hash == "given"


def test_token_count_and_layout() -> None:
    out = process_image(random_image(112, 56, seed=7), ImageProcessorConfig())
    assert out.grid_thw == (1, 4, 8)
    assert out.num_tokens(2) == 8
    assert out.pixel_values.shape == (32, 3 * 2 * 14 * 14)
    # The two temporal copies of a still image are identical.
    frames = out.pixel_values.view(32, 3, 2, 14 * 14)
    assert torch.equal(frames[:, :, 0], frames[:, :, 1])


@pytest.mark.parametrize("size", [(10, 2100), (2100, 10), (1, 300)])
def test_extreme_aspect_ratio_rejected(size: tuple[int, int]) -> None:
    with pytest.raises(InvalidInputError, match="aspect ratio"):
        process_image(random_image(*size), ImageProcessorConfig())


def test_smart_resize_matches_reference_on_many_sizes() -> None:
    rng = random.Random(0)
    configs = [
        (28, 56 * 56, 28 * 28 * 1280),
        (28, 3136, 12845056),
        (28, 4 * 28 * 28, 16 * 28 * 28),
        (32, 1024, 65536),
    ]
    for _ in range(3000):
        h, w = rng.randint(1, 4000), rng.randint(1, 4000)
        if max(h, w) / min(h, w) > 200:
            continue
        args = (h, w, *rng.choice(configs))
        assert smart_resize(*args) == hf_smart_resize(*args), args


def test_image_grid_thw_without_pixels() -> None:
    cfg = ImageProcessorConfig()
    for w, h in SIZES:
        assert image_grid_thw(h, w, cfg) == reference(random_image(w, h))[1]


def _config_dirs(tmp_path) -> dict[str, object]:
    v5 = {k: v for k, v in REAL_PREPROCESSOR.items() if k not in ("min_pixels", "max_pixels")}
    v5["size"] = {"shortest_edge": 4 * 28 * 28, "longest_edge": 256 * 28 * 28}
    return {"v4": REAL_PREPROCESSOR, "v5": v5, "custom": {"patch_size": 16, "merge_size": 2, "resample": 2}}


@pytest.mark.parametrize("layout", ["v4", "v5", "custom"])
def test_config_read_like_transformers(tmp_path, layout: str) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(_config_dirs(tmp_path)[layout]))
    cfg = ImageProcessorConfig.from_pretrained(tmp_path)
    ref = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    assert cfg.min_pixels == ref.size["shortest_edge"]
    assert cfg.max_pixels == ref.size["longest_edge"]
    assert (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size) == (
        ref.patch_size,
        ref.merge_size,
        ref.temporal_patch_size,
    )
    assert cfg.image_mean == pytest.approx(tuple(ref.image_mean))
    assert cfg.image_std == pytest.approx(tuple(ref.image_std))
    assert cfg.rescale_factor == ref.rescale_factor
    assert cfg.resample == int(ref.resample)
    img = random_image(150, 95, seed=8)
    expected = ref(images=img, return_tensors="pt")["pixel_values"]
    assert torch.equal(process_image(img, cfg).pixel_values, expected)


def test_missing_config_gives_defaults(tmp_path) -> None:
    assert ImageProcessorConfig.from_pretrained(tmp_path) == ImageProcessorConfig()
    assert ImageProcessorConfig().factor == 28


def test_raw_patches_expand_to_the_pixel_values_bit_for_bit() -> None:
    # The uint8 patches are what travels between instances; the encoding instance expands them.
    cfg = ImageProcessorConfig.from_dict(REAL_PREPROCESSOR)
    for size in [(56, 56), (300, 173), (1000, 90)]:
        image = process_image(random_image(*size), cfg)
        assert image.raw_patches.dtype == torch.uint8
        assert image.raw_patches.shape == (image.num_patches, image.pixel_values.shape[1] // 2)
        expanded = expand_patches(image.raw_patches, normalization_table(cfg), cfg.temporal_patch_size)
        assert torch.equal(expanded, image.pixel_values)

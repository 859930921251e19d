"""Pixels off the front end: what the header promises is what the encoding side decodes.

The front end reads an image's size from its header and keys the image by its bytes
(epd.inputs.image); the encoding side decodes, resizes and patchifies (epd.inputs.patches). The
reference for the patches is transformers' Qwen2-VL processor on the image as transformers
itself loads it from the same bytes.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from epd.inputs.errors import InvalidInputError
from epd.inputs.image import decode_image_bytes, image_key, read_image_header
from epd.inputs.image_processor import ImageProcessorConfig, image_grid_thw
from epd.inputs.patches import PatchPool, patches_from_file, with_pixels
from epd.inputs.processor import InputLimits, InputProcessor

from .helpers import data_url, encode, png_header_only, random_image

CFG = ImageProcessorConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
EXIF_ORIENTATION = 0x0112


def with_orientation(img: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(img, fmt, exif=exif.tobytes())


def reference_image(data: bytes) -> Image.Image:
    """The image as transformers' processor takes it: EXIF orientation applied (as its
    `load_image` does), the mode left for the processor's own RGB conversion."""
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def proc(model_dir) -> InputProcessor:
    return InputProcessor.from_pretrained(model_dir)


def cases() -> list[tuple[str, bytes]]:
    wide = random_image(200, 90, seed=5)
    return [
        ("png", encode(wide, "PNG")),
        ("png rgba", encode(random_image(123, 77, "RGBA", seed=6), "PNG")),
        ("jpeg", encode(wide, "JPEG", quality=90)),
        ("webp", encode(wide, "WEBP")),
        ("gif", encode(wide.convert("P"), "GIF")),
        ("bmp", encode(wide, "BMP")),
        ("tiff", encode(wide, "TIFF")),
        ("jpeg rotated 90", with_orientation(wide, "JPEG", 6)),
        ("jpeg rotated 270", with_orientation(wide, "JPEG", 8)),
        ("jpeg mirrored", with_orientation(wide, "JPEG", 2)),
        ("png rotated 90", with_orientation(wide, "PNG", 6)),
        ("webp rotated 90", with_orientation(wide, "WEBP", 6)),
        ("tiff rotated 90", with_orientation(wide, "TIFF", 6)),
    ]


@pytest.mark.parametrize(("name", "data"), cases(), ids=[c[0] for c in cases()])
def test_header_size_is_the_decoded_size(name: str, data: bytes) -> None:
    header = read_image_header(data)
    decoded = decode_image_bytes(data)
    assert (header.width, header.height) == decoded.size
    assert decoded.size == reference_image(data).size


@pytest.mark.parametrize(("name", "data"), cases(), ids=[c[0] for c in cases()])
def test_patches_from_the_file_equal_transformers(name: str, data: bytes) -> None:
    header = read_image_header(data)
    grid = image_grid_thw(header.height, header.width, CFG)
    raw = patches_from_file(data, CFG, grid)
    hf = Qwen2VLImageProcessorPil(min_pixels=CFG.min_pixels, max_pixels=CFG.max_pixels)
    expected = hf(images=[reference_image(data)], return_tensors="pt")
    assert tuple(expected["image_grid_thw"][0].tolist()) == grid
    image = with_pixels(_deferred(data, grid), CFG)
    assert torch.equal(image.raw_patches, raw)
    assert torch.equal(image.pixel_values, expected["pixel_values"])


def _deferred(data: bytes, grid: tuple[int, int, int]):
    from epd.inputs.types import ImageInput

    return ImageInput(None, grid, image_key(data), encoded=data)


def test_a_body_that_breaks_past_the_header_fails_where_it_is_decoded() -> None:
    png = encode(random_image(64, 64, seed=3), "PNG")
    truncated = png[: len(png) // 2]
    header = read_image_header(truncated)  # the header is whole: the front end accepts it
    grid = image_grid_thw(header.height, header.width, CFG)
    with pytest.raises(InvalidInputError, match="truncated or corrupt"):
        patches_from_file(truncated, CFG, grid)


def test_a_file_that_decodes_to_another_size_than_promised_is_refused() -> None:
    png = encode(random_image(200, 90, seed=3), "PNG")
    with pytest.raises(InvalidInputError, match="not the size its header gave"):
        patches_from_file(png, CFG, (1, 4, 4))


def test_limits_are_checked_on_the_header() -> None:
    with pytest.raises(InvalidInputError, match="too many pixels"):
        read_image_header(png_header_only(5000, 5000), max_image_pixels=1_000_000)
    with pytest.raises(InvalidInputError, match="not an image"):
        read_image_header(b"GIF89 but not really")
    with pytest.raises(InvalidInputError, match="not an image"):
        read_image_header(b"<svg xmlns='http://www.w3.org/2000/svg'/>")


def test_key_names_the_bytes_whatever_the_way_they_came(proc: InputProcessor, tmp_path) -> None:
    png = encode(random_image(40, 30, seed=9), "PNG")
    other = encode(random_image(40, 30, seed=9), "PNG", compress_level=1)  # same pixels, other file
    path = tmp_path / "a.png"
    path.write_bytes(png)
    assert image_key(png).startswith("b3:") and image_key(png) != image_key(other)
    assert np.array_equal(np.asarray(decode_image_bytes(png)), np.asarray(decode_image_bytes(other)))
    keys = set()
    for source in (png, data_url(png, "image/png"), str(path), f"file://{path}"):
        prompt = proc.process_prompt({"prompt": "<|image_pad|>", "multi_modal_data": {"image": source}})
        keys.add(prompt.images[0].content_hash)
    assert keys == {image_key(png)}


def test_the_pool_decodes_a_prompts_images_in_parallel_and_in_order(proc: InputProcessor) -> None:
    images = [random_image(60 + 10 * i, 50, seed=i) for i in range(5)]
    prompt = proc.process_prompt(
        {"prompt": "<|image_pad|>" * 5, "multi_modal_data": {"image": [encode(img, "PNG") for img in images]}}
    )
    assert all(img.pixel_values is None for img in prompt.images)  # nothing decoded at the front
    pool = PatchPool(workers=3)
    try:
        ready = pool.prepare(prompt, proc.image_config)
    finally:
        pool.close()
    eager = proc.process_prompt({"prompt": "<|image_pad|>" * 5, "multi_modal_data": {"image": images}})
    for got, want in zip(ready.images, eager.images, strict=True):
        assert got.grid_thw == want.grid_thw
        assert torch.equal(got.pixel_values, want.pixel_values)


def test_front_end_limits_hold_without_decoding(model_dir) -> None:
    limited = InputProcessor.from_pretrained(model_dir, limits=InputLimits(max_image_pixels=100 * 100))
    big = encode(random_image(101, 100, seed=1), "PNG")
    with pytest.raises(InvalidInputError, match="too many pixels"):
        limited.process_prompt({"prompt": "<|image_pad|>", "multi_modal_data": {"image": big}})

"""Qwen2-VL image preprocessing: resize, rescale, normalise, cut into patches.

A numpy re-implementation of transformers' `Qwen2VLImageProcessorPil`, kept bit-for-bit
equal to it (tests/inputs/test_image_processor.py checks): the same PIL bicubic resize of
the uint8 image, the same float64 rescale cast to float32, the same float32 normalisation,
and the same patch order. Layout of one image's `pixel_values` rows:

    row = ((bh * (grid_w // m) + bw) * m + mh) * m + mw      (m = merge_size)
    col = ((c * T + t) * P + ph) * P + pw                     (T = temporal_patch_size, P = patch_size)

so the m*m patches merged into one LLM token are contiguous rows, and the T frames of a
still image are copies of the same pixels.

InternVL's processor tiles instead of resizing (`ImageProcessorConfig.tiling`; the tiles, their
patch order and grids: epd.inputs.internvl_tiles); rescale and normalisation are the same.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from epd.inputs.errors import InvalidInputError
from epd.inputs.image import image_content_hash, to_rgb
from epd.inputs.internvl_tiles import TilingConfig, is_tiling_preprocessor, tile_count, tile_images
from epd.inputs.types import ImageInput

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class ImageProcessorConfig:
    """What `preprocessor_config.json` says about images; defaults are transformers' Qwen2-VL ones."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    tiling: TilingConfig | None = None  # InternVL: square tiles + thumbnail instead of smart_resize

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged patch group is factor x factor pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> ImageProcessorConfig:
        """Read `model_dir/preprocessor_config.json` (defaults where it is silent or missing)."""
        path = os.path.join(model_dir, "preprocessor_config.json")
        if not os.path.exists(path):
            return cls()
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if is_tiling_preprocessor(d):
            # InternVL's preprocessor config has no patch or merge size: the model config has them.
            with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
                return cls.from_tiling_dict(d, json.load(f))
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessorConfig:
        """Build from a preprocessor config dict in either the transformers 4 or 5 layout."""
        kwargs = {k: d[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "resample") if k in d}
        if "rescale_factor" in d:
            kwargs["rescale_factor"] = float(d["rescale_factor"])
        for key in ("image_mean", "image_std"):
            if key in d:
                kwargs[key] = tuple(float(x) for x in d[key])
        # transformers 5 writes size={"shortest_edge": min, "longest_edge": max}; some older files
        # write size={"min_pixels", "max_pixels"}; top-level min/max_pixels win, as in transformers.
        size = d.get("size") or {}
        min_pixels = d.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        max_pixels = d.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        if min_pixels is not None:
            kwargs["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            kwargs["max_pixels"] = int(max_pixels)
        return cls(**kwargs)

    @classmethod
    def from_tiling_dict(cls, d: dict, model_config: dict) -> ImageProcessorConfig:
        """InternVL: tiling from its preprocessor config, patch size and pixel shuffle (the merge
        size, 1 / downsample_ratio) from its config.json; one frame per patch."""
        tiling = TilingConfig.from_dict(d)
        vision = model_config.get("vision_config", {})
        trained, patch = _side(vision.get("image_size", 448)), _side(vision.get("patch_size", 14))
        merge = round(1 / model_config.get("downsample_ratio", 0.5))
        if trained != tiling.tile_size:
            raise ValueError(f"InternVL: {tiling.tile_size} px tiles for a tower trained on {trained} px")
        if tiling.tile_size % (patch * merge):
            raise ValueError(
                f"InternVL tiles of {tiling.tile_size} px are not whole {patch * merge} px groups"
            )
        pixel_keys = ("image_mean", "image_std", "rescale_factor", "resample")
        base = cls.from_dict({k: d[k] for k in pixel_keys if k in d})
        return replace(
            base,
            patch_size=patch,
            temporal_patch_size=1,
            merge_size=merge,
            min_pixels=1,
            max_pixels=tiling.max_pixels,
            tiling=tiling,
        )


def _side(size: int | list[int]) -> int:
    """A square size given as an int or as [height, width] (InternVL's vision config)."""
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Same arithmetic as transformers' `smart_resize` (including Python's round-half-even), so the
    grid always agrees with the reference. Raises `InvalidInputError` for an aspect ratio over 200
    or an empty side.
    """
    if height <= 0 or width <= 0:
        raise InvalidInputError(f"image has an empty size {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InvalidInputError(
            f"image aspect ratio must be at most {MAX_ASPECT_RATIO}, got {width}x{height} "
            f"({max(height, width) / min(height, width):.1f})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:  # only reachable with min_pixels == 0
        raise InvalidInputError(f"image {width}x{height} is too small to resize")
    return h_bar, w_bar


def image_grid_thw(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int, int]:
    """(grid_t, grid_h, grid_w) in patches for an image of this size, without touching pixels.

    A tiled (InternVL) image's grid is a one-row strip of its tokens (epd.inputs.internvl_tiles)."""
    if cfg.tiling is not None:
        tiles = tile_count(height, width, cfg.tiling)
        tokens = tiles * (cfg.tiling.tile_size // cfg.patch_size // cfg.merge_size) ** 2
        return 1, cfg.merge_size, cfg.merge_size * tokens
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return 1, h // cfg.patch_size, w // cfg.patch_size


def process_image(
    image: Image.Image, cfg: ImageProcessorConfig, content_hash: str | None = None
) -> ImageInput:
    """Resize, rescale, normalise and patchify one image, as `Qwen2VLImageProcessorPil` does.

    A non-RGB image is converted first (transparency onto white). `content_hash` defaults to
    `image_content_hash` of the RGB image; pass it when it is already known.
    """
    image = to_rgb(image)
    if content_hash is None:
        content_hash = image_content_hash(image)
    raw, grid = raw_patches(image, cfg)
    pixel_values = expand_patches(raw, normalization_table(cfg), cfg.temporal_patch_size)
    return ImageInput(pixel_values, grid, content_hash, raw_patches=raw)


def raw_patches(image: Image.Image, cfg: ImageProcessorConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """An RGB image resized and cut into uint8 patches, one frame ([N, C * P * P]), and its grid:
    what `process_image` computes before rescaling and normalising."""
    if cfg.tiling is not None:
        return _tiled_patches(image, cfg)
    h, w = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    pixels = np.asarray(image.resize((w, h), resample=cfg.resample))  # [H, W, C] uint8
    raw = torch.from_numpy(patchify(pixels, cfg.patch_size, cfg.merge_size, 1, dtype=np.uint8))
    return raw, (1, h // cfg.patch_size, w // cfg.patch_size)


def _tiled_patches(image: Image.Image, cfg: ImageProcessorConfig) -> tuple[torch.Tensor, tuple[int, ...]]:
    """InternVL: each tile's patches, row-major, tile after tile (the thumbnail last)."""
    tiles = tile_images(image, cfg.tiling, cfg.resample)
    per_tile = [patchify(np.asarray(t), cfg.patch_size, 1, 1, dtype=np.uint8) for t in tiles]
    return torch.from_numpy(np.concatenate(per_tile)), image_grid_thw(image.height, image.width, cfg)


def normalization_table(cfg: ImageProcessorConfig) -> torch.Tensor:
    """[256, C] float32: what rescale + normalize make of each uint8 value in each channel.

    Both are elementwise, so looking values up gives the very bits computing them would (the
    bit-exactness tests against transformers run through it), at a fraction of the cost, and lets
    images travel as uint8 patches (8x smaller than the tower's float32 input, which also repeats
    each still image T times) and become float32 only on the device that encodes them.
    """
    return _table(cfg.rescale_factor, tuple(cfg.image_mean), tuple(cfg.image_std))


@functools.lru_cache(maxsize=8)
def _table(factor: float, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    values = np.repeat(np.arange(256, dtype=np.uint8)[:, None], len(mean), axis=1)
    return torch.from_numpy(normalize(rescale(values, factor), mean, std))


def expand_patches(
    raw: torch.Tensor, table: torch.Tensor, temporal_patch_size: int, patch_size: int | None = None
) -> torch.Tensor:
    """uint8 patches [N, C * P * P] (patchify with T = 1) -> the tower's float32 [N, C * T * P * P].

    A video's patches hold their T frames already ([N, C * T * P * P]): given `patch_size`, rows
    that wide are only normalised, not repeated. Runs wherever `raw` is (table moved along): the
    encoding instance expands on its GPU.
    """
    channels = table.shape[1]
    per_channel = raw.shape[1] // channels
    frames_included = patch_size is not None and per_channel == temporal_patch_size * patch_size**2
    if frames_included and temporal_patch_size > 1:
        temporal_patch_size = 1  # a video's frames: already there
    table = table.to(raw.device)
    channel_of_col = torch.arange(channels, device=raw.device).repeat_interleave(per_channel)
    values = table[raw.long(), channel_of_col]  # [N, C * P * P]
    frames = values.view(raw.shape[0], channels, 1, per_channel).expand(-1, -1, temporal_patch_size, -1)
    return frames.reshape(raw.shape[0], -1)


def rescale(pixels: np.ndarray, factor: float) -> np.ndarray:
    """uint8 -> float32 times `factor`, computed in float64 first as transformers does."""
    return (pixels.astype(np.float64) * factor).astype(np.float32)


def normalize(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(x - mean) / std per channel of an [H, W, C] float32 array, in float32."""
    return (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)


def patchify(
    pixels: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int, dtype: type = np.float32
) -> np.ndarray:
    """[H, W, C] -> [grid_h * grid_w, C * T * P * P] in the order of the module docstring."""
    height, width, channels = pixels.shape
    gh, gw, m, p = height // patch_size, width // patch_size, merge_size, patch_size
    x = pixels.reshape(gh // m, m, p, gw // m, m, p, channels)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # (bh, bw, mh, mw, C, ph, pw)
    # A still image is T identical frames; broadcasting avoids materialising them before reshape.
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, p, p))
    return np.ascontiguousarray(x.reshape(gh * gw, channels * temporal_patch_size * p * p), dtype=dtype)

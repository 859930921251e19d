"""InternVL's dynamic tiling: an image becomes square tiles of its aspect ratio plus a thumbnail.

The same arithmetic as transformers' `GotOcr2ImageProcessorPil.crop_image_to_patches`, which
`InternVLProcessor` calls (it asks for tiles, `crop_to_patches=True`, whatever
preprocessor_config.json says):

    1. the grid: of all (columns, rows) with min_tiles <= columns * rows <= max_tiles, the one
       whose columns / rows is nearest the image's width / height (ties: more tiles, while the
       image's area exceeds half of theirs);
    2. the image resized (PIL, the processor's resample) to (columns * S, rows * S) and cut
       into S x S tiles, row by row;
    3. unless the grid is 1 x 1, a thumbnail: the whole image resized to S x S, last.

The tile count depends only on the image's size, so the front end knows an image's tokens from
its header (`tile_count`), before any pixel is decoded.

How an InternVL image travels as an `ImageInput`: its patches are the tiles' P x P patches,
tile by tile, row-major inside each tile; its grid is a one-row strip of the tokens the LLM
reads, (1, m, m * tokens), m the merge size (pixel shuffle: 1 / downsample_ratio). The strip
has the right patch count (a tile's (S / P)**2 patches per (S / P / m)**2 tokens) and gives the
image tokens consecutive positions on the M-RoPE width row, which is all InternVL's plain 1-D
RoPE reads (`epd.models.internvl`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from PIL import Image

from epd.inputs.errors import InvalidInputError


@dataclass(frozen=True)
class TilingConfig:
    """The tiling part of an InternVL preprocessor config (GotOcr2ImageProcessor's fields)."""

    tile_size: int = 448  # S: side of a tile in pixels (`size` {"height", "width"}, square)
    min_tiles: int = 1  # `min_patches`
    max_tiles: int = 12  # `max_patches`

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TilingConfig:
        size = d.get("size") or {"height": 448, "width": 448}
        height, width = size.get("height"), size.get("width")
        if height is None or height != width:
            raise ValueError(f"InternVL tiles must be square with a height and width, got size={size}")
        config = cls(int(height), int(d.get("min_patches", 1)), int(d.get("max_patches", 12)))
        if not 1 <= config.min_tiles <= config.max_tiles:
            raise ValueError(
                f"need 1 <= min_patches <= max_patches, got {config.min_tiles}..{config.max_tiles}"
            )
        return config

    @property
    def max_pixels(self) -> int:
        """The most pixels the tiles keep of an image (its largest canvas)."""
        return self.max_tiles * self.tile_size * self.tile_size


def is_tiling_preprocessor(d: dict[str, Any]) -> bool:
    """Whether a preprocessor_config.json describes InternVL's tiling image processor."""
    kind = str(d.get("image_processor_type", ""))
    return kind.startswith("GotOcr2ImageProcessor") or d.get("processor_class") == "InternVLProcessor"


def tile_grid(height: int, width: int, cfg: TilingConfig) -> tuple[int, int]:
    """(columns, rows) of the tile canvas for an image of this size (step 1 of the docstring)."""
    if height <= 0 or width <= 0:
        raise InvalidInputError(f"image has an empty size {width}x{height}")
    if cfg.max_tiles == 1:
        return 1, 1  # transformers resizes to one tile without looking for a grid
    return _best_grid(height, width, cfg.tile_size, cfg.min_tiles, cfg.max_tiles)


def tile_count(height: int, width: int, cfg: TilingConfig) -> int:
    """How many tiles (thumbnail included) an image of this size becomes."""
    columns, rows = tile_grid(height, width, cfg)
    return columns * rows + (columns * rows > 1)


def tile_images(image: Image.Image, cfg: TilingConfig, resample: int) -> list[Image.Image]:
    """An RGB image cut into its S x S tiles in the processor's order, thumbnail last."""
    columns, rows = tile_grid(image.height, image.width, cfg)
    side = cfg.tile_size
    canvas = image.resize((columns * side, rows * side), resample=resample)
    tiles = [
        canvas.crop((c * side, r * side, (c + 1) * side, (r + 1) * side))
        for r in range(rows)
        for c in range(columns)
    ]
    if len(tiles) > 1:
        tiles.append(image.resize((side, side), resample=resample))
    return tiles


@functools.lru_cache(maxsize=64)
def _arrangements(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (columns, rows) with min <= columns * rows <= max, by tile count; ties keep the
    order columns-then-rows, as transformers' stable sort does (the tie-break in `_best_grid`
    depends on it)."""
    grids = [
        (c, r)
        for c in range(1, max_tiles + 1)
        for r in range(1, max_tiles + 1)
        if min_tiles <= c * r <= max_tiles
    ]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


@functools.lru_cache(maxsize=1024)
def _best_grid(height: int, width: int, side: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for grid in _arrangements(min_tiles, max_tiles):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * side * side * grid[0] * grid[1]:
            best = grid  # as close: more tiles, while the image fills more than half of them
    return best

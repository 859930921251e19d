"""Deterministic test images with real pixel variety (not solid colours)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth random colour fields plus noise: every image differs, every pixel matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack(
        [np.sin(x * rng.uniform(2, 9) + y * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)], -1
    )
    pixels = (base * 90 + 128 + rng.normal(0, 25, (height, width, 3))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")

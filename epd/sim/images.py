"""Images without pixels: what the simulator's requests carry instead of pictures.

The server's input processing is kept whole (chat template, tokenizer, one placeholder token per
merged patch group); only decoding and resizing pixels is skipped. An image is known by its size:

| source                          | size from                         | identity (content hash)      |
|---------------------------------|-----------------------------------|------------------------------|
| `sim-image:<W>x<H>:<seed>`      | the name (synthetic bench images) | the name                     |
| `data:` URL, path (jsonl/shapes)| the image header (not decoded)    | the URL                      |

Its grid is the one the real processor would give it (`image_grid_thw`: the same resize rule),
so prompt lengths, patch counts and embedding sizes are the real ones, and the same image drawn
again has the same hash (encoder and prefix caches hit as they would).

Pixels stand in as 3 bytes per patch (one per channel: the narrowest rows the encoder's pixel
decoder and the scripted vision tower take, epd.cluster.pixel_decoder.PixelDecoder and
epd.engine.scripted_runner.ScriptedVision), drawn from the hash, so each image still gets its own
embeddings. A 1344 px image is 27 KB instead of the 5 MB of real uint8 patches.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from epd.inputs.errors import InvalidInputError
from epd.inputs.image import ImageSource, read_image_bytes
from epd.inputs.image_processor import ImageProcessorConfig, image_grid_thw
from epd.inputs.processor import InputProcessor
from epd.inputs.types import ImageInput

SCHEME = "sim-image:"
CHANNELS = 3


def standin_url(width: int, height: int, seed: int) -> str:
    """The name of a synthetic image (epd.bench.serve.synthetic's `image_url`), drawn never."""
    return f"{SCHEME}{width}x{height}:{seed}"


class SizedImageProcessor(InputProcessor):
    """The server's `InputProcessor`, taking each image's size instead of its pixels."""

    def load_images(self, sources: Sequence[ImageSource]) -> list[ImageInput]:
        return [standin_image(source, self.image_config) for source in sources]


def standin_image(source: ImageSource, cfg: ImageProcessorConfig) -> ImageInput:
    if not isinstance(source, str):
        raise InvalidInputError(f"the simulator takes images as URLs, not {type(source).__name__}")
    return _standin(source, cfg)


@functools.lru_cache(maxsize=1024)  # a repeated image is the same object, as drawn once
def _standin(source: str, cfg: ImageProcessorConfig) -> ImageInput:
    width, height = image_size(source)
    grid = image_grid_thw(height, width, cfg)
    content_hash = hashlib.sha256(source.encode()).hexdigest()
    _SOURCE_PIXELS[content_hash] = width * height
    return ImageInput(torch.empty(0), grid, content_hash, raw_patches=_payload(content_hash, grid))


# Each stand-in's size in pixels as sent (before the processor's resize), by content hash: what
# decoding its file costs scales with (epd.sim.host_costs).
_SOURCE_PIXELS: dict[str, int] = {}


def source_pixels(content_hash: str) -> int:
    """The pixels of the image a stand-in stands for (0 if it was never drawn here)."""
    return _SOURCE_PIXELS.get(content_hash, 0)


def image_size(source: str) -> tuple[int, int]:
    """(width, height) from a stand-in's name, or from the header of the image a URL holds."""
    if source.startswith(SCHEME):
        size, _, _seed = source[len(SCHEME) :].partition(":")
        width, _, height = size.partition("x")
        return int(width), int(height)
    try:
        with Image.open(io.BytesIO(read_image_bytes(source))) as image:
            return image.size  # the header only: nothing is decoded
    except (UnidentifiedImageError, OSError) as e:
        raise InvalidInputError(f"cannot read an image size from {source[:40]!r}: {e}") from None


def standin_patches(content_hash: str, grid: tuple[int, int, int]) -> torch.Tensor:
    """The stand-in pixels of an image with this (hex) hash and grid: 3 bytes per patch."""
    return _payload(content_hash, grid)


def _payload(content_hash: str, grid: tuple[int, int, int]) -> torch.Tensor:
    rng = np.random.default_rng(int(content_hash[:16], 16))
    t, h, w = grid
    return torch.from_numpy(rng.integers(0, 256, (t * h * w, CHANNELS), dtype=np.uint8))

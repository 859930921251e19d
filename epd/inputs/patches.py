"""Image file bytes -> uint8 patches, on the side that encodes the image, in a pool of threads.

The front end reads only an image's header (its size gives the token count) and its key; the
pixels are decoded, resized and patchified by whoever encodes the image: an encoder instance, an
EP/EPD instance, or the in-process engine (`prepare_images`). Each has a `PatchPool`, so this
work grows with the number of encoders instead of piling up in one API process.

    front end                         encoding side (PatchPool threads)
    ---------                         ---------------------------------
    bytes -> header, key, grid  ...>  decode -> RGB -> resize -> patchify (uint8)
                                      size != the header's grid?  -> InvalidInputError

Threads, not processes: Pillow's decoders and resize, and numpy's copies, release the GIL
(8 1280x960 PNGs: 414 ms on one thread, 218 ms on two, on a 2-core machine), and the patches
stay in the process that uploads them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import TypeVar

import torch

from epd.inputs.cancel import ImageLoadingCancelled, image_loading_cancel_event
from epd.inputs.errors import InvalidInputError
from epd.inputs.image import decode_image_bytes, to_rgb
from epd.inputs.image_processor import (
    ImageProcessorConfig,
    expand_patches,
    normalization_table,
    raw_patches,
)
from epd.inputs.types import ImageInput, ProcessedPrompt
from epd.inputs.video_file import VideoFileGroup, is_video_file, video_patches_from_file

T = TypeVar("T")
CANCEL_CHECK_S = 0.05  # how soon a cancelled request stops waiting for its images


def patches_from_file(data: bytes, cfg: ImageProcessorConfig, grid: tuple[int, int, int]) -> torch.Tensor:
    """uint8 patches [N, C * P * P] of an image file whose header promised `grid`.

    Bit-identical to transformers' processor on the decoded image (epd.inputs.image_processor).
    The limits were checked on the header by the front end; a file whose pixels disagree with
    its header (a truncated or corrupt body, an orientation tag after the pixel data) raises
    `InvalidInputError`: its prompt was built for `grid`, so another size would misplace tokens.
    A video file (its container named by its first bytes) gives its sampled frames' patches
    (epd.inputs.video_file).
    """
    if is_video_file(data):
        return video_patches_from_file(data, cfg, grid)
    image = to_rgb(decode_image_bytes(data))
    raw, decoded_grid = raw_patches(image, cfg)
    if tuple(decoded_grid) != tuple(grid):
        raise InvalidInputError(
            f"the image decodes to {image.width}x{image.height} px (grid {decoded_grid}), not the "
            f"size its header gave (grid {tuple(grid)}); the file is inconsistent"
        )
    return raw


def with_pixels(image: ImageInput, cfg: ImageProcessorConfig) -> ImageInput:
    """`image` with its uint8 and float patches made (from its file bytes when it has no patches,
    or a Qwen3-VL video group's file: epd.inputs.video_file.VideoFileGroup)."""
    if image.pixel_values is not None:
        return image
    raw = image.raw_patches
    if raw is None:
        if image.encoded is None:
            raise ValueError("an image needs file bytes or patches")
        if isinstance(image.encoded, VideoFileGroup):  # a Qwen3-VL group: its file decoded once for all
            raw = image.encoded.patches(cfg, image.grid_thw)
        else:
            raw = patches_from_file(image.encoded, cfg, image.grid_thw)
    pixels = expand_patches(raw, normalization_table(cfg), cfg.temporal_patch_size, cfg.patch_size)
    return replace(image, pixel_values=pixels, raw_patches=raw, encoded=None)


class PatchPool:
    """Worker threads for image decoding, with a descriptor that becomes readable when a job ends,
    so an instance's poller wakes for finished images instead of spinning on them."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or min(32, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="epd-patches")
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        future = self._pool.submit(fn, *args)
        future.add_done_callback(self._wake)
        return future

    def fileno(self) -> int:
        """Readable once a job ended since `clear`: register it with a poller."""
        return self._wake_read

    def clear(self) -> None:
        """Consume the wake-ups (call before looking at the futures, so none is missed)."""
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def prepare(self, prompt: ProcessedPrompt, cfg: ImageProcessorConfig) -> ProcessedPrompt:
        """The prompt with every image's patches made, its images in parallel; waits for them.

        Under `cancel_image_loading_on(event)`, setting the event stops the wait: the images not
        started are dropped, and `ImageLoadingCancelled` is raised once those already being
        decoded are done (a thread cannot be stopped midway; the caller holds its admission slot
        until then, so abandoned requests cannot pile work up behind its back)."""
        futures = [
            done_future(img) if img.pixel_values is not None else self.submit(with_pixels, img, cfg)
            for img in prompt.images
        ]
        cancel = image_loading_cancel_event()
        while cancel is not None and wait(futures, CANCEL_CHECK_S).not_done:
            if cancel.is_set():
                for future in futures:
                    future.cancel()
                wait(futures)
                raise ImageLoadingCancelled()
        return replace(prompt, images=[f.result() for f in futures])

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        os.close(self._wake_write)
        os.close(self._wake_read)

    def _wake(self, _: Future) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._wake_write, b"x")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already: the reader will wake


def done_future(value: T) -> Future[T]:
    """A future that has its result already: work that needs no thread (patches that came made)."""
    future: Future[T] = Future()
    future.set_result(value)
    return future

"""Images as the vision tower takes them, on the instance that encodes them: files decoded into
uint8 patches on the instance's PatchPool threads (pinned for a GPU), expanded to float32 on the
device (epd.inputs.image_processor.expand_patches)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch

from epd.cluster.messages import EncodeItem
from epd.inputs.image_processor import ImageProcessorConfig, expand_patches, normalization_table
from epd.inputs.patches import PatchPool, done_future, patches_from_file
from epd.inputs.video_file import video_patches_from_file


class PixelDecoder:
    """The tower takes normalised float32 patches; images travel as files or uint8 patches. Makes
    the uint8 patches (a file: decoded in the instance's `PatchPool`) and expands them on `device`
    (a lookup per value, bit-exact to the processor: epd.inputs.image_processor.expand_patches)."""

    def __init__(
        self, cfg: ImageProcessorConfig, device: torch.device, pool: PatchPool | None = None
    ) -> None:
        self.cfg = cfg
        self.table = normalization_table(cfg).to(device)
        self.temporal_patch_size = cfg.temporal_patch_size
        self.device = device
        self.pool = pool

    def patches(self, item: EncodeItem) -> Future[torch.Tensor]:
        """The item's uint8 patches: at once if they came made, else from a pool thread (whose
        exception is an `InvalidInputError` when the file is bad). In pinned memory when they go
        to a GPU, so their upload is asynchronous (pinned on the pool's thread where it decodes)."""
        if not item.file:
            return done_future(self._host_rows(np.frombuffer(item.pixels, np.uint8), item.raw_dim))
        if self.pool is None:
            raise RuntimeError("an image file reached an instance without a patch pool")
        if item.groups is not None:  # a chunk of a video file: its frames only
            grid, groups = tuple(item.grid), tuple(item.groups)
            return self.pool.submit(self._pinned, video_patches_from_file, item.file, self.cfg, grid, groups)
        return self.pool.submit(self._pinned, patches_from_file, item.file, self.cfg, tuple(item.grid))

    def expand(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 patches -> the tower's float32 input on the device (queued: no wait when pinned)."""
        uploaded = raw.to(self.device, non_blocking=raw.is_pinned())
        return expand_patches(uploaded, self.table, self.temporal_patch_size, self.cfg.patch_size)

    def _pinned(self, make: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
        raw = make(*args)
        return raw.pin_memory() if self.device.type == "cuda" else raw

    def _host_rows(self, values: np.ndarray, width: int) -> torch.Tensor:
        """The bytes as [rows, width] uint8, copied once: into pinned memory for a GPU, else into
        a writable tensor (the message's bytes are read-only)."""
        rows = torch.empty(values.size, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        rows.numpy()[:] = values
        return rows.view(-1, width)

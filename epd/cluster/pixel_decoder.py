"""Images as the vision tower takes them, on the instance that encodes them: files decoded into
uint8 patches on the instance's PatchPool threads (pinned for a GPU), expanded to float32 on the
device (epd.inputs.image_processor.expand_patches).

The temporal groups of a Qwen3-VL video file are items of their own, all carrying the file: those
of one task are decoded together, by one pool job that decodes the file once and hands each item
its group's patches (`_decode_groups`), not once per group."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np
import torch

from epd.cluster.messages import EncodeItem
from epd.cluster.shared_files import SharedFile
from epd.inputs.image_processor import ImageProcessorConfig, expand_patches, normalization_table
from epd.inputs.patches import PatchPool, done_future, patches_from_file
from epd.inputs.video_file import qwen3_group_patches, video_patches_from_file


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
        return self.patches_of([item])[0]

    def patches_of(self, items: Sequence[EncodeItem]) -> list[Future[torch.Tensor]]:
        """Each item's uint8 patches, as `patches` makes them; the Qwen3-VL groups among them that
        carry one file (the same bytes object, as a received task shares it) from one decode."""
        futures: list[Future[torch.Tensor] | None] = [None] * len(items)
        by_file: dict[tuple, list[int]] = {}  # (id(file), grid) -> positions of its Qwen3-VL groups
        for position, item in enumerate(items):
            if item.file and item.qwen3:
                by_file.setdefault((id(item.file), tuple(item.grid)), []).append(position)
            else:
                futures[position] = self._one(item)
        for positions in by_file.values():
            group_futures: list[Future[torch.Tensor]] = [Future() for _ in positions]
            self._pool().submit(self._decode_groups, [items[p] for p in positions], group_futures)
            for position, future in zip(positions, group_futures, strict=True):
                futures[position] = future
        return futures

    def expand(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 patches -> the tower's float32 input on the device (queued: no wait when pinned)."""
        uploaded = raw.to(self.device, non_blocking=raw.is_pinned())
        return expand_patches(uploaded, self.table, self.temporal_patch_size, self.cfg.patch_size)

    def _one(self, item: EncodeItem) -> Future[torch.Tensor]:
        if not item.file:
            return done_future(self._host_rows(np.frombuffer(item.pixels, np.uint8), item.raw_dim))
        pool, grid = self._pool(), tuple(item.grid)
        if item.groups is not None:  # a chunk of a video file: its frames only
            return pool.submit(
                self._pinned, video_patches_from_file, item.file, self.cfg, grid, tuple(item.groups)
            )
        if isinstance(item.file, SharedFile):  # read (copied, its key checked) on the pool thread
            return pool.submit(self._pinned, _patches_from_shared, item.file, self.cfg, grid)
        return pool.submit(self._pinned, patches_from_file, item.file, self.cfg, grid)

    def _decode_groups(self, items: list[EncodeItem], futures: list[Future[torch.Tensor]]) -> None:
        """On a pool thread: the file of these Qwen3-VL groups decoded once, each item's future
        given its group's patches (or the error, for all). The futures are set before this job
        ends, so the pool's wake-up (at its end) comes after them: none is missed."""
        try:
            groups = [group for item in items for group in range(*item.groups)]
            made = qwen3_group_patches(items[0].file, self.cfg, tuple(items[0].grid), groups)
            for item, future in zip(items, futures, strict=True):
                parts = [made[g] for g in range(*item.groups)]
                rows = parts[0] if len(parts) == 1 else torch.cat(parts)
                future.set_result(rows.pin_memory() if self.device.type == "cuda" else rows)
        except BaseException as error:  # a bad file (InvalidInputError) or a bug: every item hears
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    def _pool(self) -> PatchPool:
        if self.pool is None:
            raise RuntimeError("an image file reached an instance without a patch pool")
        return self.pool

    def _pinned(self, make: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
        raw = make(*args)
        return raw.pin_memory() if self.device.type == "cuda" else raw

    def _host_rows(self, values: np.ndarray, width: int) -> torch.Tensor:
        """The bytes as [rows, width] uint8, copied once: into pinned memory for a GPU, else into
        a writable tensor (the message's bytes are read-only)."""
        rows = torch.empty(values.size, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        rows.numpy()[:] = values
        return rows.view(-1, width)


def _patches_from_shared(
    file: SharedFile, cfg: ImageProcessorConfig, grid: tuple[int, int, int]
) -> torch.Tensor:
    return patches_from_file(file.read(), cfg, grid)

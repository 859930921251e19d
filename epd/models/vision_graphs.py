"""The vision tower replayed as CUDA graphs, one per batch shape (the batch's grids).

Why: an encoder instance spends its host time launching the tower's kernels (a batch of three
1280x960 images: 36-78 ms of Python dispatch for 79-80 ms of GPU work on an H200), holding the
GIL all the while; its decoding threads and its connector's send thread wait for it. A replay is
one call.

When: a batch whose grids were seen `capture_after` times before is captured (its first uses run
eagerly: image sizes that never come again are not worth a graph), at most `max_graphs` shapes
(least recently used dropped), and only batches whose patches fit the one input buffer all graphs
read from (`max_patches` rows). Anything else runs eagerly. Towers that do not split their work
into `plan` (host) and `run` (device) (epd.models.qwen2_vl_vision) get no graphs.

    batch (patches on the device, grids) --shape captured?--> copy into the input buffer, replay
                                         --seen often enough, fits?--> capture, then replay
                                         --otherwise--> the tower, eagerly

Memory: the graphs share one pool (they never run concurrently: one stream), so it holds the
largest graph's activations plus each graph's output. A replay's output is a view of that
graph's buffer, valid until the next replay of any graph: the caller consumes it on the same
stream first (the encoder worker's cache writes and sends are queued right after the replay).
Results equal the eager tower's: the same kernels on the same shapes.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

Grid = tuple[int, int, int]
MAX_GRAPHS = 8
CAPTURE_AFTER = 1  # eager uses of a shape before it is captured


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    rows: int  # patches it reads from the input buffer
    output: torch.Tensor
    plan: object  # the tower's plan: its tensors must live as long as the graph


class VisionGraphs:
    def __init__(
        self,
        tower: nn.Module,
        patch_dim: int,
        max_patches: int,
        device: torch.device,
        max_graphs: int = MAX_GRAPHS,
        capture_after: int = CAPTURE_AFTER,
    ) -> None:
        self.tower, self.device = tower, device
        self.max_graphs, self.capture_after = max_graphs, capture_after
        self.inputs = torch.empty(max_patches, patch_dim, dtype=torch.float32, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: OrderedDict[tuple[Grid, ...], _Graph] = OrderedDict()  # least recently used first
        self.seen: Counter[tuple[Grid, ...]] = Counter()
        self.replays = 0

    @classmethod
    def for_model(cls, model: nn.Module, max_patches: int, device: torch.device) -> VisionGraphs | None:
        """Graphs of `model`'s tower (`model.visual`), or None where they cannot be: off CUDA, or a
        tower that does not split into `plan` and `run`."""
        tower = getattr(model, "visual", None)
        if device.type != "cuda" or not cls.supports(tower):
            return None
        return cls(tower, model.config.vision.patch_dim, max_patches, device)

    @staticmethod
    def supports(tower: nn.Module | None) -> bool:
        return tower is not None and hasattr(tower, "plan") and hasattr(tower, "run")

    def __call__(self, patches: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        key = tuple(tuple(g) for g in grids)
        entry = self.graphs.get(key)
        if entry is None and self._worth_capturing(key, patches):
            entry = self._capture(key, patches)
        if entry is None:
            return self.tower(patches, grids)
        self.graphs.move_to_end(key)
        self.inputs[: entry.rows].copy_(patches)
        entry.graph.replay()
        self.replays += 1
        return entry.output

    def _worth_capturing(self, key: tuple[Grid, ...], patches: torch.Tensor) -> bool:
        self.seen[key] += 1
        fits = patches.shape[0] <= self.inputs.shape[0] and patches.dtype == self.inputs.dtype
        return fits and self.seen[key] > self.capture_after

    def _capture(self, key: tuple[Grid, ...], patches: torch.Tensor) -> _Graph:
        if len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)  # its memory stays in the pool, for the next capture
        rows = patches.shape[0]
        self.inputs[:rows].copy_(patches)
        plan = self.tower.plan(key, self.device)
        side = torch.cuda.Stream(self.device)  # warm-up off the capturing stream, as torch asks
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.tower.run(self.inputs[:rows], plan)  # compiles and tunes any Triton kernel first
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the instance's PatchPool threads pin host memory while a capture runs;
        # in the default (global) mode their cudaHostAlloc invalidates the capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = self.tower.run(self.inputs[:rows], plan)
        entry = _Graph(graph, rows, output, plan)
        self.graphs[key] = entry
        return entry

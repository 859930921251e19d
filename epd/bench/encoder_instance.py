"""An encoder-only instance's encode stage under load against the vision tower alone, one GPU.

    python -m epd.bench.encoder_instance --out DIR [--config-dir DIR] [--size 1280x960]
        [--images 96] [--batch 3] [--pool-workers 8,32] [--switch-intervals-ms 5,0.5]
        [--arrival-rates 0,45] [--vision-graphs] [--dry-run]

Issue 14's E-only criterion: images/s of an E instance at saturation against the offline encoder
benchmark for the same image size and batch. Qwen2.5-VL-7B config, random bf16 weights, the tower
alone (what an E instance holds). Rows:
- `tower`: `encode_images` on patches already normalised on the device, --batch images a call,
  synchronised after each (`roofline --sections encoder`'s method), and the host time of the
  call alone (the launch: when it is close to the total, the tower is bound by the CPU).
- `worker, patches made`: the instance's real `EncoderWorker`, MM cache and patch budget, every
  task queued at once (saturation), the images' uint8 patches in the tasks: no decoding.
- `worker, files`: the same with PNG files (incompressible noise, the issue's worst case) that the
  instance's `PatchPool` threads decode, resize and patchify, as an E instance gets them.
  With --arrival-rates, the tasks arrive at that many images/s instead of all at once (above the
  encoder's rate: still saturation, but its decoding threads then run beside its launches, as in
  serving); with --vision-graphs each files row runs again with the tower replayed as CUDA graphs
  (epd.models.vision_graphs).
A worker row counts from the first task queued to the last embedding sent and its write to the
cache complete on the device; the connector is the in-process one (what a send costs is the
transfer benchmarks' business), and each copy is released as soon as it arrives, as P would.
The worker's own phase totals (`EncoderWorker.phase_s`) say where its time went.
`--dry-run`: the tiny model on the CPU, small images (checks the script).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import select
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from epd.bench import roofline_setup as rs
from epd.bench.serve.synthetic import distinct_bench_image
from epd.cluster.encoder_worker import EncoderWorker
from epd.cluster.messages import EncodeItem, EncodeTask
from epd.cluster.pixel_decoder import PixelDecoder
from epd.engine.mm_cache import MMCache
from epd.inputs.image import decode_image_bytes, to_rgb
from epd.inputs.image_processor import ImageProcessorConfig, image_grid_thw, raw_patches
from epd.inputs.patches import PatchPool
from epd.models.loader import build_model
from epd.models.qwen2_vl import VISION
from epd.transfer.local import LocalConnector

RESULTS: dict[str, dict] = {}


def png_files(count: int, width: int, height: int) -> list[bytes]:
    files = []
    for seed in range(count):
        buffer = io.BytesIO()
        distinct_bench_image(width, height, seed).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


def tower_row(model: torch.nn.Module, cfg: ImageProcessorConfig, size: tuple[int, int], batch: int) -> dict:
    """images/s of the tower alone on device-resident patches, and its launch's share."""
    grid = image_grid_thw(size[1], size[0], cfg)
    rows = batch * grid[0] * grid[1] * grid[2]
    pixels = torch.randn(rows, model.config.vision.patch_dim, device=model_device(model))
    grids = [grid] * batch
    sec = rs.adaptive_wall_time(lambda: rs.encode(model, pixels, grids), budget=2.0, lo=5, hi=30)
    launches = []
    for _ in range(5):
        rs.sync()
        start = time.perf_counter()
        rs.encode(model, pixels, grids)
        launches.append(time.perf_counter() - start)
        rs.sync()
    launch = sorted(launches)[len(launches) // 2]
    return {"img_s": batch / sec, "ms_per_batch": sec * 1e3, "launch_ms_per_batch": launch * 1e3}


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass(frozen=True)
class WorkerRun:
    """How a worker row is run: patches made or files; the pool's size (None: its default);
    tasks all at once (rate 0) or arriving at `rate` images/s (decoding then runs beside the
    encodes, as in serving); the tower eager or replayed as CUDA graphs."""

    made: bool = False
    pool_workers: int | None = None
    rate: float = 0.0
    graphs: bool = False

    @property
    def label(self) -> str:
        source = "patches made" if self.made else f"files, {self.pool_workers or 'default'} threads"
        arrivals = f"{self.rate:g} img/s arriving" if self.rate else "all queued"
        return f"worker, {source}, {arrivals}, switch {sys.getswitchinterval() * 1e3:g} ms" + (
            ", tower graphs" if self.graphs else ""
        )


def worker_row(
    model: torch.nn.Module, cfg: ImageProcessorConfig, files: list[bytes], batch: int, run: WorkerRun
) -> dict:
    """images/s of a real EncoderWorker: `img_s` counts from the first task to the last embedding;
    `steady_img_s` from the tenth percentile of arrivals on (the pipeline is full by then)."""
    device = model_device(model)
    vision = model.config.vision
    grids = []
    for data in files:
        raw, grid = raw_patches(_open(data), cfg)
        grids.append((grid, raw if run.made else None))
    tokens = sum(g[0] * g[1] * g[2] for g, _ in grids) // vision.spatial_merge_size**2
    dtype = next(model.parameters()).dtype
    room = tokens * vision.out_hidden_size * dtype.itemsize + (1 << 26)
    blocks = MMCache.blocks_for_memory(room, 16, vision.out_hidden_size, dtype)
    cache = MMCache(blocks, 16, vision.out_hidden_size, dtype, device)
    pool = PatchPool(run.pool_workers)
    connector = LocalConnector(device=device)
    budget = batch * grids[0][0][0] * grids[0][0][1] * grids[0][0][2]
    decoder = PixelDecoder(cfg, device, pool)
    worker = EncoderWorker(model, cache, connector, device, "e0", decoder, budget, vision_graphs=run.graphs)
    raw_dim = 3 * cfg.patch_size**2  # a uint8 patch row (C * P * P)
    tasks = [
        _task(i, data, grid, raw, raw_dim, connector.address)
        for i, (data, (grid, raw)) in enumerate(zip(files, grids))
    ]
    rs.sync()
    start = time.perf_counter()
    arrivals = _drive(worker, pool, connector, tasks, run.rate)
    rs.sync()
    sec = time.perf_counter() - start
    pool.close()
    phases = {k: v * 1e3 / len(files) for k, v in worker.phase_s.items()}
    first = len(arrivals) // 10
    steady = (len(arrivals) - 1 - first) / (arrivals[-1] - arrivals[first])
    graphs = worker.tower_graphs.replays if worker.tower_graphs is not None else 0
    return {"img_s": len(arrivals) / sec, "steady_img_s": steady, "images": len(arrivals),
            "pool_workers": pool.workers, "graph_replays": graphs,
            "ms_per_image_by_phase": phases}  # fmt: skip


def _open(data: bytes) -> Image.Image:
    return to_rgb(decode_image_bytes(data))


def _task(i: int, data: bytes, grid, raw: torch.Tensor | None, raw_dim: int, dest: str) -> EncodeTask:
    """Image i's task: its made uint8 patches, or its file."""
    pixels, file = (b"", data) if raw is None else (raw.numpy().tobytes(), b"")
    return EncodeTask(f"r{i}", [EncodeItem(0, f"img{i}", tuple(grid), pixels, raw_dim, file)], dest)


def _drive(
    worker: EncoderWorker, pool: PatchPool, connector: LocalConnector, tasks: list[EncodeTask], rate: float
) -> list[float]:
    """Step the worker as an instance's loop does until every image's embedding arrived here;
    tasks are added all at once (`rate` 0) or one every 1/rate s. Returns when each embedding
    arrived (an embedding counts once the device has written it: its batch is reported)."""
    arrivals: list[float] = []
    start, added = time.perf_counter(), 0
    while len(arrivals) < len(tasks):
        due = len(tasks) if not rate else min(len(tasks), int((time.perf_counter() - start) * rate) + 1)
        for task in tasks[added:due]:
            worker.add(task)
        added = max(added, due)
        pool.clear()
        for done in worker.step():
            arrivals += [time.perf_counter()] * len(done.items)  # every image here is distinct
        for got in connector.poll_received():
            worker.release(got.meta["content_hash"], connector.address)
        connector.poll_sent()
        if not worker.has_work() and len(arrivals) < len(tasks):
            wait = (
                0.01
                if added == len(tasks)
                else min(0.01, max(0.0, added / rate - (time.perf_counter() - start)))
            )
            select.select([pool.fileno()], [], [], wait)
    return arrivals


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config-dir", type=Path, default=rs.SHARED_CONFIGS)
    parser.add_argument("--size", default="1280x960", help="WIDTHxHEIGHT of every image")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch", type=int, default=3, help="images per encode (the patch budget)")
    parser.add_argument(
        "--pool-workers", default="", help="comma-separated PatchPool sizes for the files row"
    )
    parser.add_argument(
        "--switch-intervals-ms", default="", help="comma-separated sys.setswitchinterval values"
    )
    parser.add_argument("--arrival-rates", default="", help="images/s the tasks arrive at (0: all at once)")
    parser.add_argument("--vision-graphs", action="store_true", help="also each files row with tower graphs")
    parser.add_argument("--dry-run", action="store_true", help="the tiny model on the CPU")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    if args.dry_run:
        width, height, args.images = min(width, 224), min(height, 168), min(args.images, 8)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = rs.build_model_dir(Path(tempfile.mkdtemp()), args.config_dir, tiny=args.dry_run)
    model = build_model(model_dir, parts=frozenset({VISION}), dtype=dtype, device=device, load_format="dummy")
    cfg = ImageProcessorConfig.from_pretrained(model_dir)
    files = png_files(args.images, width, height)
    RESULTS["setup"] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "size": f"{width}x{height}", "images": args.images, "batch": args.batch,
        "png_mb": sum(map(len, files)) / len(files) / 1e6, "cpus": os.cpu_count(),
    }  # fmt: skip
    RESULTS["tower"] = tower_row(model, cfg, (width, height), args.batch)
    _save(args.out)
    worker_row(model, cfg, files[: max(2, args.batch)], args.batch, WorkerRun(made=True))  # warm-up
    runs = [WorkerRun(made=True)]
    for workers in _numbers(args.pool_workers) or [None]:
        for rate in _numbers(args.arrival_rates) or [0.0]:
            for graphs in (False, True) if args.vision_graphs else (False,):
                runs.append(WorkerRun(False, None if workers is None else int(workers), rate, graphs))
    for interval in _numbers(args.switch_intervals_ms) or [None]:
        if interval is not None:
            sys.setswitchinterval(interval / 1e3)
        for run in runs:
            RESULTS[run.label] = worker_row(model, cfg, files, args.batch, run)
            _save(args.out)
    for name, row in RESULTS.items():
        print(name, json.dumps(row))


def _numbers(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _save(out: Path) -> None:
    (out / "encoder_instance.json").write_text(json.dumps(RESULTS, indent=2))


if __name__ == "__main__":
    main()

"""The E stage over N GPUs: the vision tower replicated or split, against one GPU (issue 22).

    python -m epd.bench.vision_tp --devices cuda:0,cuda:1 [--config-dir DIR] [--config NAME.json]
        [--sizes 448,896,1344] [--batches 1,8] [--dtype bfloat16] [--warmup 3] [--repeats 10]
        [--out vision_tp.json]
    python -m epd.bench.vision_tp --devices cpu,cpu --tiny --sizes 112,224 --batches 1,2 --dtype float32

Qwen2.5-VL-7B's tower by default (shared/model-configs, random weights: `load_format="dummy"`),
a batch of `batch` images of side x side px, each cut as the model's processor cuts it. Per
(side, batch), three ways to encode it:

| mode       | who encodes                                   | weights a rank holds      | collectives     |
|------------|-----------------------------------------------|---------------------------|-----------------|
| one        | rank 0 alone, the whole batch (the rest idle) | the whole tower           | none            |
| replicated | each rank its share of the images (at batch 1 | the whole tower           | none            |
|            | rank 0 alone)                                 |                           |                 |
| split      | every rank, the whole batch together          | its heads and MLP columns | 2 a block       |
|            |                                               | (epd.parallel.vision)     |                 |

Each timed batch: every rank's device synchronised, the ranks meet at a host barrier, each runs
its part and synchronises its device; the batch takes from the first rank's start to the last
rank's end (`time.perf_counter`: one clock for the processes of a host). `--warmup` untimed
batches first (the NCCL communicators, kernel tuning), then the median of `--repeats`. A check
per mode: the first case's first image against one GPU's (max |diff| / max |one GPU's|).

One process a device (epd.parallel.launch.run_on_ranks: nccl between GPUs, gloo on the CPU),
`--devices` naming which (the ranks see only those: CUDA_VISIBLE_DEVICES). The tower splits N ways
when its heads and its MLP width do: Qwen2.5-VL-7B's 16 heads and 3420 columns split 2 or 4
ways. `--tiny`: the config shrunk (epd.bench.roofline_setup), to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import distributed as dist

from epd.bench import roofline_setup as rs
from epd.inputs.image_processor import ImageProcessorConfig
from epd.models.qwen2_vl import VISION
from epd.parallel.build import build_rank_model
from epd.parallel.group import TensorParallelGroup, backend_for
from epd.parallel.launch import run_on_ranks

MODES = ("one", "replicated", "split")


@dataclass(frozen=True)
class Options:
    """What every rank needs to run the cases (pickled to each)."""

    model_dir: str
    device_type: str  # "cuda" or "cpu"
    sizes: tuple[int, ...]
    batches: tuple[int, ...]
    dtype: str
    warmup: int
    repeats: int


# ---- on every rank ----------------------------------------------------------------------------


def measure(group: TensorParallelGroup, opts: Options) -> dict:
    """Per (side, batch, mode): this rank's (start, end) of each timed batch. Rank 0 adds the
    check (the first case's first image, each mode against one device) and its device's name.
    Only plain numbers go back: a tensor would travel as shared memory that this process, gone
    by then, would have to hand over."""
    device = _rank_device(opts.device_type, group.world_size)
    build = partial(
        build_rank_model, opts.model_dir, group, parts=frozenset({VISION}), dtype=getattr(torch, opts.dtype),
        device=device, load_format="dummy",
    )  # fmt: skip
    whole = build()
    towers = {"one": whole, "replicated": whole}
    if group.world_size > 1:
        towers["split"] = build(split_vision=True)
    processor = ImageProcessorConfig.from_pretrained(opts.model_dir)
    spans, checks = {}, {}
    for side in opts.sizes:
        for batch in opts.batches:
            torch.manual_seed(side * 1000 + batch)  # the same images on every rank (split needs them)
            pixels, grids = rs.image_batch(processor, whole.config.vision, side, batch, device)
            for mode, model in towers.items():
                work = _work(mode, model, pixels, grids, group)
                first = work()  # every rank: the split tower's all-reduces pair up
                if group.rank == 0 and mode not in checks:
                    checks[mode] = _first_image(first)
                spans[side, batch, mode] = _timed(work, group, device, opts.warmup, opts.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"spans": spans, "check": check(checks) if group.rank == 0 else {}, "device": name}


def check(checks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each mode's first image against one device's: max |diff| / max |one device's|."""
    reference = checks["one"]
    scale = reference.abs().max().item() or 1.0
    return {
        mode: (got - reference).abs().max().item() / scale for mode, got in checks.items() if mode != "one"
    }


def _rank_device(device_type: str, world_size: int) -> torch.device:
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())  # run_on_ranks set it: rank r
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # the ranks share the cores
    return torch.device("cpu")


def _work(
    mode: str, model: torch.nn.Module, pixels: torch.Tensor, grids: list, group: TensorParallelGroup
) -> Callable[[], list[torch.Tensor]]:
    """This rank's part of encoding the batch in `mode` (a call returning its embeddings)."""
    if mode == "split":
        return partial(_encode, model, pixels, grids)
    if mode == "replicated":
        lo, hi = _share(len(grids), group)
    else:  # one: rank 0 alone
        lo, hi = 0, len(grids) if group.rank == 0 else 0
    if lo == hi:
        return list  # nothing for this rank: it only meets the others at the barrier
    per_image = pixels.shape[0] // len(grids)
    return partial(_encode, model, pixels[lo * per_image : hi * per_image], grids[lo:hi])


def _share(images: int, group: TensorParallelGroup) -> tuple[int, int]:
    """Rank r's images [lo, hi): equal shares, the first ranks one more when they do not divide."""
    base, extra = divmod(images, group.world_size)
    lo = group.rank * base + min(group.rank, extra)
    return lo, lo + base + (group.rank < extra)


@torch.inference_mode()
def _encode(model: torch.nn.Module, pixels: torch.Tensor, grids: list) -> list[torch.Tensor]:
    return model.encode_images(pixels, grids)


def _first_image(embeddings: list[torch.Tensor]) -> torch.Tensor | None:
    return embeddings[0].float() if embeddings else None


def _timed(
    work: Callable[[], object], group: TensorParallelGroup, device: torch.device, warmup: int, repeats: int
) -> list[tuple[float, float]]:
    for _ in range(warmup):
        _span(work, group, device)
    return [_span(work, group, device) for _ in range(repeats)]


def _span(
    work: Callable[[], object], group: TensorParallelGroup, device: torch.device
) -> tuple[float, float]:
    """(start, end) of one batch on this rank: all ranks start after a host barrier, with their
    devices idle; the end waits for this rank's device."""
    _sync(device)
    dist.barrier(group=group.commands)
    start = time.perf_counter()
    work()
    _sync(device)
    return start, time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- in the launching process ---------------------------------------------------------------


def summarize(results: list[dict], opts: Options, ranks: int) -> list[dict]:
    """One row per (side, batch, mode): the batch's median and best ms over the repeats."""
    processor = ImageProcessorConfig.from_pretrained(opts.model_dir)
    rows = []
    for (side, batch, mode), _ in results[0]["spans"].items():
        per_rank = [r["spans"][side, batch, mode] for r in results]
        times = [max(end for _, end in runs) - min(start for start, _ in runs) for runs in zip(*per_rank)]
        grid, _ = rs.image_grid(processor, side)
        ms = statistics.median(times) * 1e3
        rows.append(dict(side=side, batch=batch, mode=mode, ranks=1 if mode == "one" else ranks,
                         grid=list(grid), ms=ms, ms_best=min(times) * 1e3,
                         img_s=batch / ms * 1e3))  # fmt: skip
    return rows


def print_table(rows: list[dict], ranks: int) -> None:
    by_case: dict[tuple[int, int], dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault((row["side"], row["batch"]), {})[row["mode"]] = row
    modes = [m for m in MODES if any(m in case for case in by_case.values())]
    names = {"one": "one device", "replicated": f"replicated x{ranks}", "split": f"split x{ranks}"}
    print("| side | batch | " + " | ".join(f"{names[m]} ms | img/s" for m in modes) + " |")
    print("|---|---|" + "---|---|" * len(modes))
    for (side, batch), case in by_case.items():
        cells = [f"{case[m]['ms']:.2f} | {case[m]['img_s']:.2f}" for m in modes]
        print(f"| {side}px | {batch} | " + " | ".join(cells) + " |")


def visible_devices(devices: list[str]) -> tuple[str, str | None]:
    """(device type, CUDA_VISIBLE_DEVICES for the ranks: the named GPUs, in order; None on a CPU)."""
    parsed = [torch.device(d) for d in devices]
    kinds = {d.type for d in parsed}
    if len(kinds) != 1 or kinds - {"cuda", "cpu"}:
        raise ValueError(f"--devices must all be cuda:I or all cpu, got {devices}")
    if parsed[0].type == "cpu":
        return "cpu", None
    seen = os.environ.get("CUDA_VISIBLE_DEVICES")  # indices are this process's: map them through it
    ids = seen.split(",") if seen else [str(i) for i in range(max(d.index or 0 for d in parsed) + 1)]
    return "cuda", ",".join(ids[d.index or 0] for d in parsed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="cuda:0,cuda:1", help="one rank each, comma-separated")
    parser.add_argument("--config-dir", type=Path, default=rs.SHARED_CONFIGS)
    parser.add_argument("--config", default="qwen2_5_vl_7b.json")
    parser.add_argument("--sizes", default="448,896,1344", help="image sides in px")
    parser.add_argument("--batches", default="1,8", help="images per batch")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per case and mode")
    parser.add_argument("--repeats", type=int, default=10, help="timed batches per case and mode")
    parser.add_argument("--out", type=Path, default=Path("vision_tp.json"))
    parser.add_argument("--tiny", action="store_true", help="the config shrunk: checks the script on a CPU")
    args = parser.parse_args(argv)
    devices = args.devices.split(",")
    device_type, visible = visible_devices(devices)
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible  # the spawned ranks see these, rank r the r-th
    with tempfile.TemporaryDirectory(prefix="epd-vision-tp-") as tmp:
        model_dir = rs.build_model_dir(Path(tmp) / "model", args.config_dir, args.config, args.tiny)
        opts = Options(str(model_dir), device_type, _ints(args.sizes), _ints(args.batches), args.dtype,
                       args.warmup, args.repeats)  # fmt: skip
        started = time.perf_counter()
        results = run_on_ranks(measure, len(devices), opts, backend=backend_for(devices[0]))
        rows = summarize(results, opts, len(devices))
    report = {
        "meta": {"devices": devices, "device_name": results[0]["device"], "config": args.config,
                 "tiny": args.tiny, "torch": torch.__version__, "seconds": time.perf_counter() - started,
                 **{k: v for k, v in asdict(opts).items() if k != "model_dir"}},
        "check_max_rel_diff": results[0]["check"],
        "rows": rows,
    }  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2))
    print_table(rows, len(devices))
    print(f"check (max |diff| / max |one device|): {report['check_max_rel_diff']}; written to {args.out}")


def _ints(csv: str) -> tuple[int, ...]:
    return tuple(int(x) for x in csv.split(",") if x)


if __name__ == "__main__":
    main()

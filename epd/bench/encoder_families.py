"""The encoder roofline and the E-only memory gain of the model families beyond Qwen2.5-VL, on one GPU.

    python -m epd.bench.encoder_families --out DIR [--config-dir epd/bench/configs]
        [--families internvl3_8b,internvl2_26b_like,qwen3_vl_8b] [--memory-families ...]
        [--sections encoder,memory] [--utilization 0.9] [--dry-run]

Full-size configs of epd/bench/configs, random bf16 weights (`load_format="dummy"`):
- encoder: the vision tower alone (tower + projector: what an E instance holds; the LLM is never
  built) encoding batches of 1 and 8 square images of 448, 896 and 1344 px, cut as each model's
  processor cuts them: InternVL into 1, 5 and 10 tiles of 448 px (thumbnail included), Qwen3-VL
  into 28, 56 and 84 patches of 16 px a side. Images/s, ms an image, TFLOP/s, and MFU = FLOPs
  counted from the config (epd.bench.roofline_setup.encoder_flops) / time / a measured
  8192^3 bf16 matmul rate (the same figures as epd.bench.roofline's encoder section).
- memory: epd.bench.memory's `peak` section for each of --memory-families: peak memory of an
  E-only instance encoding 1, 4 and 8 images of 1344 px against a 1EPD instance (whole model,
  KV cache sized at --utilization) encoding the same; the InternVL2-26B-like shape first (its
  6B tower is where E-only gains most).

Figures go to DIR/encoder_families.json, rewritten after each family (a run cut short keeps
what it measured); two tables are printed last. `--dry-run`: tiny models on the CPU through the
same code (memory figures read 0 there: the CPU has no allocator statistics).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from epd.bench import memory
from epd.bench import roofline_setup as rs
from epd.engine.memory import free_cached_memory
from epd.inputs.image_processor import ImageProcessorConfig
from epd.models.loader import build_model
from epd.models.qwen2_vl import VISION

FAMILIES = ("internvl3_8b", "internvl2_26b_like", "qwen3_vl_8b")
MEMORY_FAMILIES = ("internvl2_26b_like", "internvl3_8b", "qwen3_vl_8b")
SIDES = (448, 896, 1344)
BATCHES = (1, 8)
MATMUL_N = 8192
DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
RESULTS: dict[str, dict] = {"encoder": {}, "memory": {}}


def shrink_for_dry_run() -> None:
    """Small shapes on the CPU (tiny models: 112 px InternVL tiles, so 224 and 448 px images are
    5 and 10 tiles; Qwen3-VL's processor scales 224 px up to its 256 px minimum)."""
    global SIDES, BATCHES, MATMUL_N, DEVICE, DTYPE
    SIDES, BATCHES, MATMUL_N, DEVICE, DTYPE = (224, 448), (1, 2), 256, torch.device("cpu"), torch.float32
    memory.shrink_for_dry_run()


# ---- encoder --------------------------------------------------------------------------------


def bench_encoder(family: str, model_dir: Path, flops_ceiling: float) -> None:
    """Every (side, batch) case of one family's tower; rows to RESULTS["encoder"][family]."""
    model = build_model(model_dir, parts=frozenset({VISION}), dtype=DTYPE, device=DEVICE, load_format="dummy")
    processor = ImageProcessorConfig.from_pretrained(model_dir)
    merge = model.config.vision.spatial_merge_size
    rows = RESULTS["encoder"].setdefault(family, {})
    try:
        for side in SIDES:
            grid, tiles = rs.image_grid(processor, side)
            for batch in BATCHES:
                pixels, grids = rs.image_batch(processor, model.config.vision, side, batch, DEVICE)
                figures = rs.encoder_figures(model, pixels, grids, flops_ceiling)
                key = f"{side}px b{batch}"
                rows[key] = dict(side=side, tiles=tiles, grid=list(grid), tokens=math.prod(grid) // merge**2,
                                 batch=batch, **figures)  # fmt: skip
                print(f"[encoder] {family} {key}: " + _figures(rows[key]), flush=True)
    finally:
        del model
        free_cached_memory(DEVICE)


# ---- memory ---------------------------------------------------------------------------------


def bench_memory(family: str, model_dir: Path, utilization: float) -> None:
    """epd.bench.memory's peak section for one family; its rows to RESULTS["memory"][family]."""
    section = f"peak {family}"
    memory.bench_peak(model_dir, utilization, section)
    RESULTS["memory"][family] = memory.RESULTS.pop(section)


# ---- report ---------------------------------------------------------------------------------


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _figures(row: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in row.items())


def print_tables() -> None:
    ceiling = RESULTS.get("ceilings", {}).get("matmul_TFLOPs", 0.0)
    print(f"\nEncoder (MFU against a measured {_fmt(ceiling)} TFLOP/s bf16 matmul)")
    print("| family | side | tiles | tokens/img | batch | images/s | ms/image | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family, rows in RESULTS["encoder"].items():
        for r in rows.values():
            cells = (family, f"{r['side']}px", r["tiles"] or "-", r["tokens"], r["batch"], r["img_s"],
                     r["ms_per_image"], r["TFLOPs"], r["MFU"])  # fmt: skip
            print("| " + " | ".join(_fmt(c) for c in cells) + " |")
    print("\nMemory: E-only vs aggregated (1EPD) encoding the same batch (GiB)")
    print("| family | case | tiles/img | weights | KV | peak allocated | peak reserved | over budget | oom |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family, rows in RESULTS["memory"].items():
        for case, r in rows.items():
            cells = (family, case, r["tiles_per_image"] or "-", r["weights_gib"], r["kv_gib"],
                     r["peak_allocated_gib"], r["peak_reserved_gib"], r["over_budget"], r["oom"])  # fmt: skip
            print("| " + " | ".join(_fmt(c) for c in cells) + " |")


def save(out: Path, started: float, utilization: float) -> None:
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu (dry run)"
    RESULTS["meta"] = {
        "device": name, "dtype": str(DTYPE), "seconds": time.perf_counter() - started,
        "torch": torch.__version__, "memory_image_side": memory.IMAGE_SIDE,
        "memory_utilization": utilization, "memory_total_gib": memory.gib(memory.total_memory()),
        "memory_max_num_batched_tokens": memory.MAX_BATCHED_TOKENS,
    }  # fmt: skip
    (out / "encoder_families.json").write_text(json.dumps(RESULTS, indent=2))


# ---- main -----------------------------------------------------------------------------------


def _names(csv: str) -> list[str]:
    return [name.removesuffix(".json") for name in csv.split(",") if name]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="encoder-families-out")
    parser.add_argument("--config-dir", type=Path, default=rs.BENCH_CONFIGS)
    parser.add_argument("--families", default=",".join(FAMILIES), help="encoder section: NAME(.json),...")
    parser.add_argument("--memory-families", default=",".join(MEMORY_FAMILIES), help="memory section")
    parser.add_argument("--sections", default="encoder,memory", help="comma-separated")
    parser.add_argument("--utilization", type=float, default=0.9, help="the 1EPD instance's KV cache sizing")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: checks the script")
    args = parser.parse_args(argv)
    if args.dry_run:
        shrink_for_dry_run()
    sections = set(args.sections.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    started = time.perf_counter()
    dirs = Path(tempfile.mkdtemp())

    @functools.cache
    def model_dir(name: str) -> Path:  # no weights in it: config, tokenizer, preprocessor config
        return rs.build_model_dir(dirs / name, args.config_dir, f"{name}.json", args.dry_run)

    try:
        flops = rs.matmul_rate(MATMUL_N, DEVICE)
        RESULTS["ceilings"] = {"matmul_TFLOPs": flops / 1e12, "matmul_n": MATMUL_N}
        for family in _names(args.families) if "encoder" in sections else []:
            bench_encoder(family, model_dir(family), flops)
            save(out, started, args.utilization)
        for family in _names(args.memory_families) if "memory" in sections else []:
            bench_memory(family, model_dir(family), args.utilization)
            save(out, started, args.utilization)
    finally:
        save(out, started, args.utilization)
        print_tables()


if __name__ == "__main__":
    main()

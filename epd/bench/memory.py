"""Memory disaggregation, measured on one GPU: what an instance gains by not holding the other part.

    python -m epd.bench.memory --out DIR [--config-dir DIR] [--config NAME.json] [--utilization 0.9]
        [--dry-run]

Qwen2.5-VL-7B's shape by default (--config: any full-size config, e.g. epd/bench/configs'
internvl2_26b_like.json), random bf16 weights (`load_format="dummy"`). Each section builds its
instances one at a time and frees each (model, KV cache, `torch.cuda.empty_cache()`) before the next:
- peak: peak allocated and reserved memory of an E-only instance (vision weights) encoding a batch
  of N images of 1344 px (as the model's processor makes them: InternVL's 10 tiles a 1344 px
  image), against a 1EPD instance (whole model + its KV cache sized at --utilization) encoding
  the same batch; N = 1, 4, 8.
- encode_capacity: the largest batch of 1344 px images each encodes within --utilization x device
  memory: the E-only instance in all of it but its weights, the EPD instance in what its weights and
  KV cache leave (doubling, then bisection; an out-of-memory error counts as too large).
- kv_capacity: KV blocks (and tokens) of a P/D-only instance (language weights) against an
  aggregated one, both sized by epd.engine.memory at --utilization; each cache is then allocated and
  the sizing's dummy step run beside it, to check that the peak stays within the budget.
The KV cache is sized for steps of --max-num-batched-tokens (an EPD step's images fill them too).
The MM caches (E's output, P's input; 256 MiB each by default) are left out on both sides.

Every figure goes to DIR/memory.json; a table is printed last. `--dry-run`: a tiny model on the CPU
through the same code (the CPU has no allocator statistics: memory figures read 0 there, a
nominal 512 MiB device stands in for the budget, and the searches stop at their cap).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from epd.bench import roofline_setup as rs
from epd.engine.kv_cache import allocate_kv_cache, bytes_per_block
from epd.engine.memory import (
    GIB,
    MemoryProfile,
    free_cached_memory,
    kv_cache_bytes,
    profile_memory,
    run_dummy_step,
)
from epd.inputs.image_processor import ImageProcessorConfig
from epd.models.loader import build_model
from epd.models.qwen2_vl import ALL_PARTS, LANGUAGE, VISION

BATCHES = (1, 4, 8)
IMAGE_SIDE = 1344
MAX_SEARCH_IMAGES = 512  # the capacity search stops here
MAX_BATCHED_TOKENS = 16384
MAX_NUM_SEQS = 256
BLOCK_SIZE = 16
DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
DRY_RUN_TOTAL = 512 << 20  # the device memory a dry run pretends to have
RESULTS: dict[str, dict] = {}

E_ONLY, PD_ONLY, EPD = frozenset({VISION}), frozenset({LANGUAGE}), ALL_PARTS
NAMES = {E_ONLY: "E", PD_ONLY: "PD", EPD: "EPD"}


def shrink_for_dry_run() -> None:
    """Tiny shapes on the CPU: every code path of the script in seconds."""
    global BATCHES, IMAGE_SIDE, MAX_SEARCH_IMAGES, MAX_BATCHED_TOKENS, MAX_NUM_SEQS, DEVICE, DTYPE
    BATCHES, IMAGE_SIDE, MAX_SEARCH_IMAGES = (1, 2), 112, 4
    MAX_BATCHED_TOKENS, MAX_NUM_SEQS, DEVICE, DTYPE = 64, 4, torch.device("cpu"), torch.float32


def record(section: str, key: str, **values) -> None:
    RESULTS.setdefault(section, {})[key] = values
    print(f"[{section}] {key}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()), flush=True)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---- memory readings (zeros on the CPU) -----------------------------------------------------


def total_memory() -> int:
    if DEVICE.type != "cuda":
        return DRY_RUN_TOTAL
    return torch.cuda.get_device_properties(DEVICE).total_memory


def held_bytes(inst: Instance) -> int:
    """What the instance holds between steps: the allocator's reserve on CUDA (weights, KV cache,
    rounding); on the CPU the sum of its tensors."""
    if DEVICE.type == "cuda":
        return torch.cuda.memory_reserved(DEVICE)
    return inst.weight_bytes + inst.kv_bytes


def start_peak() -> None:
    """Free what earlier work left cached, then count peaks from here."""
    free_cached_memory(DEVICE)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)


def peak_bytes() -> tuple[int, int]:
    """(allocated, reserved) peaks since `start_peak`, the device synchronised first."""
    if DEVICE.type != "cuda":
        return 0, 0
    torch.cuda.synchronize(DEVICE)
    return torch.cuda.max_memory_allocated(DEVICE), torch.cuda.max_memory_reserved(DEVICE)


def gib(n: int) -> float:
    return n / GIB


# ---- instances ------------------------------------------------------------------------------


@dataclass
class Instance:
    """What one instance holds: its weights and, for one with the language model sized at a
    utilization, its KV cache (allocated, so that it occupies the device as in serving)."""

    model: nn.Module | None
    weight_bytes: int
    processor: ImageProcessorConfig  # how the model's processor cuts an image into patches
    profile: MemoryProfile | None = None
    kv_cache: torch.Tensor | None = None
    num_blocks: int = 0

    @property
    def kv_bytes(self) -> int:
        return 0 if self.kv_cache is None else self.kv_cache.numel() * self.kv_cache.element_size()


@contextmanager
def instance(model_dir: Path, parts: frozenset[str], utilization: float | None = None) -> Iterator[Instance]:
    """Build an instance's model (and KV cache, see `Instance`); free both on leaving."""
    free_cached_memory(DEVICE)
    model = build_model(model_dir, parts=parts, dtype=DTYPE, device=DEVICE, load_format="dummy")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    inst = Instance(model, weights, ImageProcessorConfig.from_pretrained(model_dir))
    try:
        if LANGUAGE in parts and utilization is not None:
            _add_kv_cache(inst, utilization)
        yield inst
    finally:
        inst.model = inst.kv_cache = None
        free_cached_memory(DEVICE)


def _add_kv_cache(inst: Instance, utilization: float) -> None:
    inst.profile = measure_profile(inst)
    kv = kv_cache_bytes(
        total_memory(), utilization, inst.profile.used_after_load, inst.profile.activation_peak
    )
    text = inst.model.config.text
    inst.num_blocks = kv // bytes_per_block(text, BLOCK_SIZE, DTYPE)
    inst.kv_cache = allocate_kv_cache(text, inst.num_blocks, BLOCK_SIZE, DTYPE, DEVICE)


def measure_profile(inst: Instance) -> MemoryProfile:
    """epd.engine.memory's profile on CUDA; on the CPU the same dummy step, unmeasured (weights only)."""
    if DEVICE.type == "cuda":
        return profile_memory(inst.model, DEVICE, MAX_BATCHED_TOKENS, MAX_NUM_SEQS, "auto", BLOCK_SIZE)
    run_dummy_step(inst.model, DEVICE, MAX_BATCHED_TOKENS, MAX_NUM_SEQS, "auto", BLOCK_SIZE)
    return MemoryProfile(used_after_load=inst.weight_bytes, activation_peak=0)


# ---- encoding -------------------------------------------------------------------------------


def encode(inst: Instance, num_images: int) -> None:
    """Encode `num_images` images of IMAGE_SIDE px in one packed batch, as an encoder step does."""
    pixels, grids = rs.image_batch(inst.processor, inst.model.config.vision, IMAGE_SIDE, num_images, DEVICE)
    rs.encode(inst.model, pixels, grids)


def measure_encode(inst: Instance, num_images: int) -> dict:
    """Peak allocated and reserved bytes of one encode, or `oom` where the device ran out."""
    start_peak()
    oom = False
    try:
        encode(inst, num_images)
    except torch.OutOfMemoryError:
        oom = True  # the error's frames hold the batch's tensors: freed once this block ends
    allocated, reserved = peak_bytes()
    free_cached_memory(DEVICE)
    return {"oom": oom, "peak_allocated": allocated, "peak_reserved": reserved}


def largest_fitting(fits: Callable[[int], bool], cap: int) -> int:
    """The largest n in 1..cap with fits(n), 0 if none; fits must be monotone (true, then false).

    Doubling finds a bracket in log2(answer) tries, then bisection closes it.
    """
    lo, hi = 0, 1
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)  # the first size known (or assumed, past the cap) not to fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ---- sections -------------------------------------------------------------------------------


def bench_peak(model_dir: Path, utilization: float, section: str = "peak") -> None:
    """E-only against 1EPD encoding the same batches; rows go to RESULTS[section]."""
    budget = int(utilization * total_memory())
    for parts in (E_ONLY, EPD):
        with instance(model_dir, parts, utilization if LANGUAGE in parts else None) as inst:
            grid, tiles = rs.image_grid(inst.processor, IMAGE_SIDE)
            tokens = math.prod(grid) // inst.model.config.vision.spatial_merge_size**2
            for n in BATCHES:
                m = measure_encode(inst, n)
                record(
                    section, f"{NAMES[parts]} {n}x{IMAGE_SIDE}px",
                    tiles_per_image=tiles, tokens_per_image=tokens,
                    weights_gib=gib(inst.weight_bytes), kv_gib=gib(inst.kv_bytes),
                    peak_allocated_gib=gib(m["peak_allocated"]), peak_reserved_gib=gib(m["peak_reserved"]),
                    over_budget=m["peak_reserved"] > budget, oom=m["oom"],
                )  # fmt: skip


def bench_encode_capacity(model_dir: Path, utilization: float) -> None:
    budget = int(utilization * total_memory())
    for parts in (E_ONLY, EPD):
        with instance(model_dir, parts, utilization if LANGUAGE in parts else None) as inst:
            held = held_bytes(inst)

            def fits(n: int) -> bool:
                m = measure_encode(inst, n)
                return not m["oom"] and m["peak_reserved"] <= budget

            largest = largest_fitting(fits, MAX_SEARCH_IMAGES)
            record(
                "encode_capacity", NAMES[parts],
                budget_gib=gib(budget), held_gib=gib(held), left_for_encoder_gib=gib(budget - held),
                max_images=largest, at_cap=largest == MAX_SEARCH_IMAGES,
            )  # fmt: skip


def bench_kv_capacity(model_dir: Path, utilization: float) -> None:
    budget = int(utilization * total_memory())
    for parts in (PD_ONLY, EPD):
        with instance(model_dir, parts, utilization) as inst:
            start_peak()
            run_dummy_step(inst.model, DEVICE, MAX_BATCHED_TOKENS, MAX_NUM_SEQS, "auto", BLOCK_SIZE)
            _, peak = peak_bytes()
            record(
                "kv_capacity", NAMES[parts],
                blocks=inst.num_blocks, tokens=inst.num_blocks * BLOCK_SIZE, kv_gib=gib(inst.kv_bytes),
                weights_gib=gib(inst.weight_bytes), loaded_gib=gib(inst.profile.used_after_load),
                activation_peak_gib=gib(inst.profile.activation_peak),
                step_peak_with_kv_gib=gib(peak), within_budget=peak <= budget,
            )  # fmt: skip


SECTIONS = {"peak": bench_peak, "encode_capacity": bench_encode_capacity, "kv_capacity": bench_kv_capacity}


# ---- main -----------------------------------------------------------------------------------


def print_table() -> None:
    print("\n| section | case | figures |\n|---|---|---|")
    for section, rows in RESULTS.items():
        for key, values in rows.items():
            print(f"| {section} | {key} | " + ", ".join(f"{k} {_fmt(v)}" for k, v in values.items()) + " |")


def _meta(config: str, utilization: float, seconds: float) -> dict:
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu (dry run)"
    return {
        "config": config,
        "device": name,
        "total_gib": gib(total_memory()),
        "utilization": utilization,
        "image_side": IMAGE_SIDE,
        "max_num_batched_tokens": MAX_BATCHED_TOKENS,
        "max_num_seqs": MAX_NUM_SEQS,
        "block_size": BLOCK_SIZE,
        "dtype": str(DTYPE),
        "seconds": seconds,
        "torch": torch.__version__,
    }


def _apply_options(args: argparse.Namespace) -> None:
    global MAX_BATCHED_TOKENS
    if args.dry_run:
        shrink_for_dry_run()
    MAX_BATCHED_TOKENS = args.max_num_batched_tokens or MAX_BATCHED_TOKENS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="memory-out")
    parser.add_argument("--config-dir", default=str(rs.SHARED_CONFIGS))
    parser.add_argument("--config", default="qwen2_5_vl_7b.json", help="NAME.json in --config-dir")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--utilization", type=float, default=0.9, help="gpu_memory_utilization of both sides")
    parser.add_argument("--max-num-batched-tokens", type=int, help=f"(default: {MAX_BATCHED_TOKENS})")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script")
    args = parser.parse_args(argv)
    _apply_options(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    started = time.perf_counter()
    model_dir = rs.build_model_dir(
        Path(tempfile.mkdtemp()) / "model", Path(args.config_dir), args.config, tiny=args.dry_run
    )
    try:
        for section in args.sections.split(","):
            SECTIONS[section](model_dir, args.utilization)
    finally:
        RESULTS["meta"] = {"run": _meta(args.config, args.utilization, time.perf_counter() - started)}
        (out / "memory.json").write_text(json.dumps(RESULTS, indent=2))
        print_table()


if __name__ == "__main__":
    main()

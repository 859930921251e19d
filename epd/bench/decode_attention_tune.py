"""Decode attention's launch shapes compared, kernel alone, one GPU: which split count, tile,
warps and pipeline stages read the paged KV cache fastest at each batch and context.

    python -m epd.bench.decode_attention_tune [--out FILE.json] [--cases 1x1024,64x1024,...]

Qwen2.5-VL-7B's head layout (28 query heads, 4 KV heads, dim 128), bf16, pages of 16 tokens
spread over the cache (every sequence's pages interleaved with the others', as a busy engine's
are). Each launch shape is checked against the default's output (bf16 tolerance) before it is
timed inside a CUDA graph (epd.bench.roofline_setup.graph_time). Prints, per case, the old
default (`choose_num_splits`, `DecodeLaunch()`), what `choose_launch` picks, and the five fastest,
in microseconds and TB/s of KV read.
"""

from __future__ import annotations

import argparse
import itertools
import json
from functools import partial

import torch

from epd.attention.context import build_device_metadata
from epd.attention.triton_decode import DecodeLaunch, choose_launch, choose_num_splits, paged_decode_attention
from epd.bench.roofline_setup import graph_time

HEADS, KV_HEADS, DIM, PAGE = 28, 4, 128, 16
CASES = "1x1024,8x1024,32x4096,64x1024,64x4096,128x1024,256x1024,256x4096"
LAUNCHES = [
    DecodeLaunch(block_n, warps, stages)
    for block_n, warps, stages in itertools.product((32, 64, 128), (4, 8), (2, 3, 4))
]


def case_inputs(batch: int, ctx: int) -> tuple:
    pages = batch * ctx // PAGE
    cache = torch.randn(2, pages, PAGE, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    # page j of sequence i is page j * batch + i: neighbours in a table are far apart in memory
    tables = [[j * batch + i for j in range(ctx // PAGE)] for i in range(batch)]
    meta = build_device_metadata([1] * batch, [ctx] * batch, tables, torch.device("cuda"))
    return q, cache, meta


def run_case(batch: int, ctx: int, sms: int) -> dict:
    q, cache, meta = case_inputs(batch, ctx)
    call = partial(paged_decode_attention, q, cache[0], cache[1], meta.block_tables, meta.seq_lens, DIM**-0.5)
    default_splits = choose_num_splits(batch, KV_HEADS, ctx, sms)
    reference = call(default_splits)
    read = cache.numel() * cache.element_size()
    rows = []
    for splits in sorted(
        {max(1, default_splits // 2), default_splits, default_splits * 2, default_splits * 4}
    ):
        for launch in LAUNCHES:
            if splits > 1 and ctx // splits < launch.block_n:
                continue
            got = call(splits, launch=launch)
            ok = torch.allclose(got.float(), reference.float(), atol=2e-2, rtol=2e-2)
            us = graph_time(partial(call, splits, launch=launch)) * 1e6 if ok else float("nan")
            rows.append({"splits": splits, **launch.__dict__, "us": us, "TBps": read / us / 1e6, "ok": ok})
    default = _row(rows, default_splits, DecodeLaunch())
    splits, launch = choose_launch(batch, KV_HEADS, DIM, ctx, sms)
    chosen = _row(rows, splits, launch or DecodeLaunch())
    fastest = sorted((r for r in rows if r["ok"]), key=lambda r: r["us"])[:5]
    return {"case": f"b{batch} ctx{ctx}", "default": default, "chosen": chosen, "fastest": fastest,
            "wrong": [r for r in rows if not r["ok"]]}  # fmt: skip


def _row(rows: list[dict], splits: int, launch: DecodeLaunch) -> dict | None:
    """The measured row of (splits, launch shape), if that shape was run."""
    shape = {"splits": splits, **launch.__dict__}
    return next((r for r in rows if all(r[k] == v for k, v in shape.items())), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--cases", default=CASES)
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for case in args.cases.split(","):
        batch, ctx = (int(v) for v in case.split("x"))
        result = run_case(batch, ctx, sms)
        results.append(result)
        d = result["default"]
        print(f"{result['case']}: default splits {d['splits']} {d['us']:.1f} us ({d['TBps']:.2f} TB/s)"
              f"{'  WRONG: ' + str(len(result['wrong'])) if result['wrong'] else ''}")  # fmt: skip
        if result["chosen"] is not None:
            print(f"    chosen: {result['chosen']['us']:.1f} us")
        for r in result["fastest"]:
            shape = f"splits {r['splits']:2d} block_n {r['block_n']:3d} warps {r['num_warps']}"
            shape += f" stages {r['num_stages']}"
            print(f"    {shape}: {r['us']:.1f} us ({r['TBps']:.2f} TB/s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

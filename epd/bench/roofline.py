"""GPU roofline of one device: how close decode, prefill and the encoder come to the chip's limits.

    python -m epd.bench.roofline --out DIR [--sections ceilings,kernels,gemv,decode,prefill,encoder,e2e]

Qwen2.5-VL-7B's shape, random bf16 weights, one GPU. Each section appends to DIR/roofline.json;
a table of every figure is printed last.
- ceilings: device-to-device copy bandwidth (bytes read + written) and a large bf16 matmul.
- kernels: the attention kernels alone (decode bandwidth; prefill vs torch SDPA/flash).
- gemv: single-row projections of the model's shapes, cuBLAS vs the Triton GEMV's configs
  (epd.bench.roofline_gemv).
- decode: one step (runner.run + greedy read-back) at batch x context, with CUDA graphs, eager,
  graphs without the fused layer kernels, graphs with cuBLAS instead of the GEMV at batch 1,
  and eager with the per-sequence torch_sdpa backend (the baseline); `--decode-modes` picks.
  MBU = (weights + KV read) / time / measured copy bandwidth.
- profile: kernel time of eager decode steps at each --decode-batches size (default 1 and
  128), first --decode-contexts context, to DIR/profile_*.txt.
- prefill: one step of 1x2k, 1x8k, 8x1k tokens and 4 images of 1344 px + 64 text tokens
  (image embeddings given: the LLM alone). MFU = flops / time / measured matmul rate.
- encoder: images/s at 448, 896, 1344 px, batch 1 and 8; MFU likewise.
- e2e: epd (1EPD, in process) against transformers `generate` (epd.bench.roofline_e2e).
`--decode-batches`, `--decode-contexts`, `--hf-batches` take fewer cases where device time is short.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.nn import functional as F

from epd.attention.backend import TorchSDPABackend
from epd.bench import roofline_e2e as e2e
from epd.bench import roofline_gemv
from epd.bench import roofline_setup as rs
from epd.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from epd.engine.cuda_graphs import DecodeGraphs
from epd.engine.kv_cache import bind_kv_cache
from epd.inputs.image_processor import ImageProcessorConfig
from epd.models.layers import fused

DECODE_BATCHES = (1, 8, 32, 128, 256)
DECODE_CONTEXTS = (1024, 4096)
DECODE_BATCHES_ASKED = False  # --decode-batches given: the profile section takes them too
DECODE_MODES = ("graphs", "eager", "graphs_unfused", "graphs_cublas", "eager_torch_sdpa")
PREFILL = {"1x2k": (1, 2048), "1x8k": (1, 8192), "8x1k": (8, 1024)}  # sequences, tokens each
PREFILL_IMAGES = (4, 1344, 64)  # images, side, text tokens
ENCODER_SIDES = (448, 896, 1344)
COPY_ELEMS, MATMUL_N = 1 << 30, 8192
DEVICE = torch.device("cuda")
RESULTS: dict[str, dict] = {}


def shrink_for_dry_run() -> None:
    """Small shapes on the CPU: exercises every code path of the script in a minute."""
    global \
        DECODE_BATCHES, \
        DECODE_CONTEXTS, \
        PREFILL, \
        PREFILL_IMAGES, \
        ENCODER_SIDES, \
        COPY_ELEMS, \
        MATMUL_N, \
        DEVICE
    DECODE_BATCHES, DECODE_CONTEXTS = (1, 3), (64,)
    PREFILL, PREFILL_IMAGES = {"1x200": (1, 200), "3x50": (3, 50)}, (2, 112, 16)
    ENCODER_SIDES, COPY_ELEMS, MATMUL_N, DEVICE = (112, 224), 1 << 20, 256, torch.device("cpu")
    e2e.WORKLOADS, e2e.NUM_REQUESTS, e2e.HF_BATCHES, e2e.DEVICE = (
        {"A": (112, 6), "B": (56, 10)},
        4,
        (1, 4),
        DEVICE,
    )


def record(section: str, key: str, **values) -> None:
    RESULTS.setdefault(section, {})[key] = values
    print(f"[{section}] {key}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()), flush=True)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---- ceilings -------------------------------------------------------------------------------


def bench_ceilings() -> tuple[float, float]:
    src = torch.randn(COPY_ELEMS, device=DEVICE, dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    t = rs.device_time(partial(dst.copy_, src), 3, 10)
    bw = 2 * src.numel() * 2 / t
    del src, dst
    flops = rs.matmul_rate(MATMUL_N, DEVICE)
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    record("ceilings", "device", copy_GBps=bw / 1e9, matmul_TFLOPs=flops / 1e12, name=name)
    return bw, flops


# ---- attention kernels alone ----------------------------------------------------------------


def bench_kernels(bw: float) -> None:
    """The attention kernels alone, on Qwen2.5-VL-7B's head layout (28 query heads, 4 KV heads)."""
    for batch, ctx in [(1, 1024), (1, 32768), (32, 4096), (256, 4096)]:
        _kernel_decode(batch, ctx, bw)
    for seqs, length in [(1, 8192), (8, 1024)]:
        _kernel_prefill(seqs, length)


def _kernel_decode(
    batch: int, ctx: int, bw: float, heads: int = 28, kv_heads: int = 4, dim: int = 128
) -> None:
    from epd.attention.context import build_device_metadata
    from epd.attention.triton_decode import choose_launch, paged_decode_attention

    page = 16
    cache = torch.randn(2, batch * ctx // page, page, kv_heads, dim, device=DEVICE, dtype=torch.bfloat16)
    q = torch.randn(batch, heads, dim, device=DEVICE, dtype=torch.bfloat16)
    tables = [list(range(i * ctx // page, (i + 1) * ctx // page)) for i in range(batch)]
    t = build_device_metadata([1] * batch, [ctx] * batch, tables, DEVICE)
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    splits, launch = choose_launch(batch, kv_heads, dim, ctx, sms)
    run = partial(
        paged_decode_attention, q, cache[0], cache[1], t.block_tables, t.seq_lens, dim**-0.5, splits,
        launch=launch,
    )  # fmt: skip
    sec = rs.graph_time(run)
    read = cache.numel() * cache.element_size()
    record("kernels", f"decode b{batch} ctx{ctx}", us=sec * 1e6, splits=splits,
           GBps=read / sec / 1e9, of_copy_bw=read / sec / bw)  # fmt: skip


def _kernel_prefill(seqs: int, length: int, heads: int = 28, kv_heads: int = 4, dim: int = 128) -> None:
    from epd.attention.context import build_device_metadata
    from epd.attention.triton_prefill import paged_prefill_attention

    page, n = 16, seqs * length
    q, k, v = (
        torch.randn(n, h, dim, device=DEVICE, dtype=torch.bfloat16) for h in (heads, kv_heads, kv_heads)
    )
    cache = torch.stack([k, v]).view(2, n // page, page, kv_heads, dim)
    tables = [list(range(i * length // page, (i + 1) * length // page)) for i in range(seqs)]
    t = build_device_metadata([length] * seqs, [length] * seqs, tables, DEVICE)
    flops = 4 * dim * heads * seqs * length * (length + 1) / 2
    triton_run = partial(
        paged_prefill_attention, q, cache[0], cache[1], t.block_tables, t.query_starts, t.seq_lens,
        [length] * seqs, dim**-0.5,
    )  # fmt: skip
    sec = rs.device_time(triton_run, 3, 10)
    record("kernels", f"prefill triton {seqs}x{length}", ms=sec * 1e3, TFLOPs=flops / sec / 1e12)
    # The alternative: torch SDPA per sequence, given the best layout it can have (heads-major,
    # contiguous, K/V expanded to every query head: what its flash kernel wants). Layout
    # changes are not timed, though a real backend would pay them.
    group = heads // kv_heads
    per_seq = [
        tuple(x[i * length : (i + 1) * length].transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v))
        for i in range(seqs)
    ]
    per_seq = [(qs, ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)) for qs, ks, vs in per_seq]
    sec = rs.device_time(partial(_sdpa_per_sequence, per_seq), 3, 10)
    record("kernels", f"prefill torch_sdpa {seqs}x{length}", ms=sec * 1e3, TFLOPs=flops / sec / 1e12)


def _sdpa_per_sequence(per_seq: list) -> None:
    for qs, ks, vs in per_seq:
        F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)


# ---- decode ---------------------------------------------------------------------------------


def bench_decode(engine, bw: float, modes: set[str]) -> None:
    """One decode step per (context, batch): CUDA graphs, eager Triton, eager torch_sdpa, and,
    at 1k context, graphs without the fused layer kernels (batch 1 and 128) and graphs with
    cuBLAS for the single-row projections instead of the Triton GEMV (batch 1)."""
    runner = engine.runner
    graphs, triton_backend = runner.graphs, runner.backend
    variants = {}
    if graphs is not None:
        for name in ("graphs_unfused", "graphs_cublas"):
            variants[name] = DecodeGraphs(
                runner.model, runner.block_size, graphs.scratch_block, graphs.width, DEVICE
            )
    try:
        for ctx in DECODE_CONTEXTS:
            for batch_size in DECODE_BATCHES:
                first_ctx = ctx == DECODE_CONTEXTS[0]
                _decode_case(engine, ctx, batch_size, bw, variants if first_ctx else {}, modes)
    finally:
        runner.graphs, runner.backend = graphs, triton_backend
        bind_kv_cache(runner.model, runner.kv_cache, triton_backend)
        fused.ENABLED, fused.GEMV = True, True


def _decode_modes(runner, batch_size: int, variants: dict) -> list[tuple[str, object, object, bool, bool]]:
    """(name, graphs or None, attention backend, fused layer kernels, Triton GEMV) to time."""
    graphs, backend = runner.graphs, runner.backend
    modes = [("graphs", graphs, backend, True, True)] if graphs is not None else []
    modes.append(("eager", None, backend, True, True))
    if "graphs_unfused" in variants and batch_size in (1, 128):
        modes.append(("graphs_unfused", variants["graphs_unfused"], backend, False, False))
    if "graphs_cublas" in variants and batch_size == 1:
        modes.append(("graphs_cublas", variants["graphs_cublas"], backend, True, False))
    if batch_size <= 32 and backend.name != TorchSDPABackend.name:
        modes.append(("eager_torch_sdpa", None, TorchSDPABackend(), False, False))
    return modes


def _decode_case(engine, ctx: int, batch_size: int, bw: float, variants: dict, wanted: set[str]) -> None:
    runner, cfg = engine.runner, engine.model.config.text
    graphs, backend = runner.graphs, runner.backend
    alloc = rs.BlockAllocator(
        engine.block_manager.num_blocks, runner.block_size
    )  # fresh: wraps only if too big
    reqs = [rs.text_request(f"d{i}", ctx - 1, 1, seed=i) for i in range(batch_size)]
    tables = [alloc.table(ctx) for _ in reqs]
    step = partial(_step, runner, rs.batch_of(reqs), tables)
    layer_params, head_params = rs.llm_matmul_params(cfg)
    read = 2 * (layer_params + head_params) + batch_size * ctx * rs.kv_bytes_per_token(cfg)
    for mode, mode_graphs, mode_backend, mode_fused, gemv in _decode_modes(runner, batch_size, variants):
        if mode not in wanted:
            continue
        runner.graphs, runner.backend, fused.ENABLED, fused.GEMV = mode_graphs, mode_backend, mode_fused, gemv
        bind_kv_cache(runner.model, runner.kv_cache, mode_backend)
        sec = rs.wall_time(step, 3, 10 if mode != "eager_torch_sdpa" else 4)
        values = dict(ms=sec * 1e3, MBU=read / sec / bw, tok_s=batch_size / sec)
        if mode_graphs is not None:
            graph, _ = mode_graphs.graphs[mode_graphs.padded_size(batch_size)]
            replay = rs.device_time(graph.replay, 3, 10)
            values.update(replay_ms=replay * 1e3, replay_MBU=read / replay / bw)
        record("decode", f"b{batch_size} ctx{ctx} {mode}", **values, kv_shared=alloc.wrapped)
    runner.graphs, runner.backend, fused.ENABLED, fused.GEMV = graphs, backend, True, True
    bind_kv_cache(runner.model, runner.kv_cache, backend)


def _step(runner, batch, tables) -> list[int]:
    """One step as the engine runs it: the forward, then greedy tokens read back to the host."""
    return runner.run(batch, tables).argmax(-1).tolist()


def bench_profile(engine, out: Path) -> None:
    """Where a decode step's device time goes: kernels of eager steps (same kernels as the
    graphs, without launch gaps in their sums), top 25 by total time, to DIR/profile_*.txt."""
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    graphs, runner.graphs = runner.graphs, None
    try:
        for batch_size, ctx in _profiled_cases():
            alloc = rs.BlockAllocator(engine.block_manager.num_blocks, runner.block_size)
            reqs = [rs.text_request(f"f{i}", ctx - 1, 1, seed=i) for i in range(batch_size)]
            step = partial(_step, runner, rs.batch_of(reqs), [alloc.table(ctx) for _ in reqs])
            step()
            cuda = DEVICE.type == "cuda"
            with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step()
            key = "cuda_time_total" if cuda else "cpu_time_total"
            table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
            (out / f"profile_b{batch_size}_ctx{ctx}.txt").write_text(table)
            print(table, flush=True)
    finally:
        runner.graphs = graphs


def _profiled_cases() -> list[tuple[int, int]]:
    """(batch, context) of the profiled steps: the decode sizes asked for, else batch 1 and 128."""
    if DECODE_BATCHES_ASKED:
        return [(b, DECODE_CONTEXTS[0]) for b in DECODE_BATCHES]
    return [(1, 1024), (128, 1024)]


# ---- prefill --------------------------------------------------------------------------------


def bench_prefill(engine, flops_ceiling: float) -> None:
    config = engine.model.config
    alloc = rs.BlockAllocator(engine.block_manager.num_blocks, engine.runner.block_size)
    for name, (n, length) in PREFILL.items():
        _prefill_case(
            engine, alloc, name, [rs.text_request(f"p{i}", length, seed=i) for i in range(n)], flops_ceiling
        )
    images, side, text = PREFILL_IMAGES
    req = rs.image_request(
        "p0", config.image_token_id, [side] * images, text, config.text.hidden_size, DEVICE
    )
    _prefill_case(engine, alloc, f"{images}img{side}+{text}", [req], flops_ceiling)


def _prefill_case(engine, alloc: rs.BlockAllocator, name: str, reqs: list, flops_ceiling: float) -> None:
    tables = [alloc.table(r.num_tokens) for r in reqs]
    lens = [r.num_tokens for r in reqs]
    sec = rs.wall_time(partial(_step, engine.runner, rs.batch_of(reqs), tables), 2, 5)
    flops = rs.prefill_flops(engine.model.config.text, lens, lens)
    record("prefill", name, ms=sec * 1e3, tokens=sum(lens), tok_s=sum(lens) / sec,
           TFLOPs=flops / sec / 1e12, MFU=flops / sec / flops_ceiling)  # fmt: skip


# ---- encoder --------------------------------------------------------------------------------


def bench_encoder(engine, processor: ImageProcessorConfig, flops_ceiling: float) -> None:
    """Images/s of the vision tower (packed images, batched window attention)."""
    for side in ENCODER_SIDES:
        for batch_size in (1, 8):
            pixels, grids = rs.image_batch(processor, engine.model.config.vision, side, batch_size, DEVICE)
            figures = rs.encoder_figures(engine.model, pixels, grids, flops_ceiling)
            record("encoder", f"{side}px b{batch_size}", **figures)


# ---- main -----------------------------------------------------------------------------------


def build_engine(model_dir: Path, kv_gib: float, max_model_len: int, dtype: str):
    from epd.engine.llm_engine import LLMEngine
    from epd.inputs.tokenizer import Tokenizer

    config = EngineConfig(
        model=ModelConfig(str(model_dir), dtype=dtype, load_format="dummy", max_model_len=max_model_len),
        cache=CacheConfig(kv_cache_memory_bytes=int(kv_gib * (1 << 30))),
        scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=max_model_len),
        device=str(DEVICE),
        attention_backend="auto",
    )
    return LLMEngine(config, Tokenizer.from_pretrained(str(model_dir)))


def print_table() -> None:
    print("\n| section | case | figures |\n|---|---|---|")
    for section, rows in RESULTS.items():
        for key, values in rows.items():
            print(f"| {section} | {key} | " + ", ".join(f"{k} {_fmt(v)}" for k, v in values.items()) + " |")


def _csv(values: tuple) -> str:
    return ",".join(map(str, values))


def _apply_size_options(args: argparse.Namespace) -> None:
    """--decode-batches, --decode-contexts, --hf-batches: fewer cases where device time is short."""
    global DECODE_BATCHES, DECODE_CONTEXTS, DECODE_BATCHES_ASKED
    if args.decode_batches:
        DECODE_BATCHES = tuple(int(b) for b in args.decode_batches.split(","))
        DECODE_BATCHES_ASKED = True
    if args.decode_contexts:
        DECODE_CONTEXTS = tuple(int(c) for c in args.decode_contexts.split(","))
    if args.hf_batches:
        e2e.HF_BATCHES = tuple(int(b) for b in args.hf_batches.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="roofline-out")
    parser.add_argument("--config-dir", default=str(rs.SHARED_CONFIGS))
    parser.add_argument("--sections", default="ceilings,kernels,decode,prefill,encoder,e2e")
    parser.add_argument("--decode-batches", help=f"comma-separated (default: {_csv(DECODE_BATCHES)})")
    parser.add_argument("--decode-contexts", help=f"comma-separated (default: {_csv(DECODE_CONTEXTS)})")
    parser.add_argument("--decode-modes", default=_csv(DECODE_MODES))
    parser.add_argument(
        "--hf-batches", help=f"transformers' static batches (default: {_csv(e2e.HF_BATCHES)})"
    )
    parser.add_argument("--kv-gib", type=float, help="KV cache (default: free memory - 24 GiB, at most 64)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script")
    args = parser.parse_args()
    sections = args.sections.split(",")
    dtype = "float32" if args.dry_run else "bfloat16"
    if args.dry_run:
        shrink_for_dry_run()
        sections = [s for s in sections if s != "kernels"]
    _apply_size_options(args)
    kv_gib = args.kv_gib or (0.25 if args.dry_run else min(64.0, torch.cuda.mem_get_info()[0] / 2**30 - 24))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    started = time.perf_counter()
    model_dir = rs.build_model_dir(
        Path(tempfile.mkdtemp()) / "model", Path(args.config_dir), tiny=args.dry_run
    )
    try:
        bw, flops = bench_ceilings()
        if "kernels" in sections:
            bench_kernels(bw)
        if {"gemv", "decode", "profile", "prefill", "encoder"} & set(sections):
            engine = build_engine(model_dir, kv_gib, 16384, dtype)
            engine.runner.kv_cache.normal_()  # never time on zeros
            if "gemv" in sections:
                roofline_gemv.bench_gemv(engine.model.config.text, record, bw, DEVICE)
            if "decode" in sections:
                bench_decode(engine, bw, set(args.decode_modes.split(",")))
            if "profile" in sections:
                bench_profile(engine, out)
            if "prefill" in sections:
                bench_prefill(engine, flops)
            if "encoder" in sections:
                bench_encoder(engine, ImageProcessorConfig.from_pretrained(model_dir), flops)
            del engine
            gc.collect()  # the engine holds reference cycles (scheduler -> engine callbacks)
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
        if "e2e" in sections:
            make = lambda: build_engine(model_dir, min(kv_gib, 20.0), 8192, dtype)  # noqa: E731
            e2e.bench_e2e(model_dir, make, record, getattr(torch, dtype))
    finally:
        RESULTS["meta"] = {"run": {"seconds": time.perf_counter() - started, "torch": torch.__version__}}
        (out / "roofline.json").write_text(json.dumps(RESULTS, indent=2))
        print_table()


if __name__ == "__main__":
    main()

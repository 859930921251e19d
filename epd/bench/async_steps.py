"""Decode steps with async scheduling off and on: per-step time, and the host's share of it.

    python -m epd.bench.model_dir --out /tmp/qwen2_5_vl_7b                  # the 7B shape, no weights
    python -m epd.bench.async_steps --model /tmp/qwen2_5_vl_7b --device cuda:0 --dtype bfloat16 \\
        --load-format dummy [--batches 1,16,64] [--context 1024] [--steps 100] [--json OUT]
    python -m epd.bench.async_steps --model epd/demo/model --device cpu --context 64 --steps 10   # checks it
    python -m epd.bench.async_steps ... --tp 2        # a tensor-parallel engine on cuda:0, cuda:1

One aggregated engine in this process, greedy decodes of `--context` random prompt tokens each. Per
batch size, async off then on (the same engine: its weights, cache and graphs; `engine.async_steps`
is swapped), `--steps` timed `step_requests` calls after the prefill and a warm-up:
- step_ms: wall time of a call (median): with async on, steady calls each read one step, so this is
  the time per token of every request in the batch;
- wait_ms: what of it the host spends blocked on the device (both engines on the event after
  their step's tokens are copied out: `HostCopy`, the synchronous one in the sampler's read);
- host_ms: the rest (step_ms - wait_ms): scheduling, input building, launches, stops, outputs. The
  synchronous engine adds it to the device's time; async scheduling hides it behind the step in
  flight, so step_ms there should fall to the device's time where the host is the shorter;
- overlapped: the share of steps launched while the one before was still in flight.
On a CPU the device is the host: nothing overlaps, wait_ms is 0 and the figures only check the script.
With `--tp N` the engine is a tensor-parallel instance's rank 0 over N-1 workers (one process and
GPU each: epd.parallel.launch; gloo ranks on a CPU), as `1EPD@tpN` runs it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from epd import SamplingParams
from epd.engine.async_scheduling import AsyncStepper
from epd.engine.factory import PartsFactory, load_model_parts
from epd.engine.llm_engine import LLMEngine
from epd.engine.sampler import HostCopy
from epd.entrypoints.options import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.parallel.group import TensorParallelGroup
from epd.parallel.launch import run_on_ranks
from epd.parallel.parts import instance_parts
from epd.parallel.worker import build_worker

WARMUP_STEPS = 5
PLAIN_TOKENS = 300  # prompt ids below this: no special token (image, video) of the demo or test tokenizers


class Waits:
    """Seconds the host spent blocked on the device so far (summed over both engines' wait points)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        result = HostCopy.result

        def timed_result(copy: HostCopy):  # every step's read, synchronous or async
            if copy.event is not None:
                self._timed(copy.event.synchronize)
            return result(copy)

        HostCopy.result = timed_result

    def _timed(self, wait) -> None:
        start = time.perf_counter()
        wait()
        self.seconds += time.perf_counter() - start


def build_engine(
    args: argparse.Namespace, max_batch: int, model_parts: PartsFactory = load_model_parts
) -> tuple[LLMEngine, InputProcessor]:
    kv_gib = args.kv_cache_gib or (0.25 if args.device == "cpu" else 8.0)
    engine_args = EngineArgs(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        kv_cache_memory_bytes=int(kv_gib * (1 << 30)),
        max_num_seqs=max_batch,
        max_model_len=args.context + WARMUP_STEPS + args.steps + 8,
    )
    processor = InputProcessor.from_pretrained(args.model)
    engine = LLMEngine(engine_args.engine_config(), processor.tokenizer, model_parts=model_parts)
    return engine, processor


def measure(
    engine: LLMEngine, processor: InputProcessor, args, batch: int, async_on: bool, waits: Waits
) -> dict:
    """One batch size in one mode: prefill, warm up, then time `--steps` decode calls."""
    engine.async_steps = AsyncStepper(engine) if async_on else None
    generator = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0, max_tokens=WARMUP_STEPS + args.steps + 4, ignore_eos=True)
    label = f"{'on' if async_on else 'off'}{batch}-"
    requests = []
    for i in range(batch):
        ids = torch.randint(10, PLAIN_TOKENS, (args.context,), generator=generator).tolist()
        requests.append(engine.add_request(f"{label}{i}", processor.process_prompt(ids), params))
    while any(not r.output_token_ids for r in requests):
        engine.step_requests()  # the prefills
    for _ in range(WARMUP_STEPS):
        engine.step_requests()
    steps, blocked = [], []
    overlapped_before = engine.async_steps.num_overlapped_steps if async_on else 0
    for _ in range(args.steps):
        waited, start = waits.seconds, time.perf_counter()
        engine.step_requests()
        steps.append(time.perf_counter() - start)
        blocked.append(waits.seconds - waited)
    overlapped = (engine.async_steps.num_overlapped_steps - overlapped_before) if async_on else 0
    for r in requests:
        engine.abort_request(r.request_id)
    engine.block_manager.reset_prefix_cache()  # every batch prefills anew
    step_ms = statistics.median(steps) * 1e3
    wait_ms = statistics.median(blocked) * 1e3
    return {
        "async": "on" if async_on else "off",
        "batch": batch,
        "step_ms": step_ms,
        "host_ms": statistics.median(s - b for s, b in zip(steps, blocked)) * 1e3,
        "wait_ms": wait_ms,
        "overlapped": overlapped / args.steps,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory (python -m epd.bench.model_dir)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--load-format", default="safetensors", choices=("safetensors", "dummy"))
    p.add_argument("--batches", default="1,16,64", help="decode batch sizes, comma-separated")
    p.add_argument("--context", type=int, default=1024, help="prompt tokens per request")
    p.add_argument("--steps", type=int, default=100, help="timed decode calls per batch and mode")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="default: 8 on CUDA, 0.25 on a CPU")
    p.add_argument("--json", type=Path, default=None, help="write the rows here too")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (GPUs cuda:0..N-1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tp == 1:
        rows = measure_all(args, load_model_parts)
    else:
        rows = run_on_ranks(_on_rank, args.tp, args)[0]
    if args.json is not None:
        args.json.write_text(
            json.dumps({"setup": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1)
        )


def measure_all(args: argparse.Namespace, model_parts: PartsFactory) -> list[dict]:
    batches = [int(b) for b in args.batches.split(",")]
    engine, processor = build_engine(args, max(batches), model_parts)
    waits = Waits()
    columns = ["async", "batch", "step_ms", "host_ms", "wait_ms", "overlapped"]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    rows = []
    for batch in batches:
        for async_on in (False, True):
            row = measure(engine, processor, args, batch, async_on, waits)
            rows.append(row)
            cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
            print("| " + " | ".join(cells) + " |", flush=True)
    if args.tp > 1:
        engine.runner.stop_workers()
    return rows


def _on_rank(group: TensorParallelGroup, args: argparse.Namespace) -> list[dict] | None:
    """Rank 0 measures its engine over the workers; each worker executes until it is stopped."""
    device = args.device if args.device.startswith("cpu") else f"cuda:{group.rank}"
    if group.rank > 0:
        build_worker(group, device).serve()
        return None
    args.device = device
    return measure_all(args, instance_parts(group))


if __name__ == "__main__":
    main()

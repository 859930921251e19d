"""Decodes under a burst of long prompts, with whole-prompt prefill and with chunked prefill budgets.

    python -m epd.bench.chunked_prefill --config-dir DIR [--budgets 512,1024,2048,4096,8192]
        [--encode-ahead off|on|both] [--ahead-priority P] [--vision-cuda-graphs] [--switch-interval-ms MS]

One aggregated engine in this process (1EPD), dummy bf16 weights of a full-size config: 32 text
requests of 1k prompt tokens decode; then 4 requests of 3 images of 1280x960 and 40 words arrive
at once. Per policy, one row: the decode step before the burst, every step while the burst
prefills (what the running decodes wait per token: their ITL), the burst's TTFT, and the time the
vision tower took on the GPU (encoding inside the steps is not chunked: it stalls decodes whatever
the budget; `--encode-ahead on` encodes beside the steps instead, epd.engine.encode_ahead). Needs
a CUDA device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from epd import SamplingParams
from epd.bench.roofline_setup import SHARED_CONFIGS, build_model_dir
from epd.engine.encode_ahead import EncodeAhead
from epd.engine.llm_engine import LLMEngine
from epd.entrypoints.options import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.testing.images import noise_image

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
WORDS = " ".join(["word"] * 40)
DECODES, BURST, WHOLE_BUDGET = 32, 4, 16384


class VisionTimer:
    """Wraps the model's `encode_images`, summing its GPU time: CUDA events on the stream it
    runs on (the engine's, or encode-ahead's own), so timing it synchronises nothing."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.encode, self.spans = model.encode_images, []
        model.encode_images = self

    def __call__(self, pixels: torch.Tensor, grids: list, *tower: object) -> list[torch.Tensor]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.encode(pixels, grids, *tower)
        end.record()
        self.spans.append((start, end))
        return out

    def take_seconds(self) -> float:
        torch.cuda.synchronize()
        seconds = sum(start.elapsed_time(end) for start, end in self.spans) / 1e3
        self.spans = []
        return seconds


def burst(processor: InputProcessor, seed: int) -> list:
    prompts = []
    for i in range(BURST):
        images = [noise_image(1280, 960, seed=seed * 100 + 3 * i + j) for j in range(3)]
        prompts.append(
            processor.process_prompt({"prompt": IMAGE * 3 + WORDS, "multi_modal_data": {"image": images}})
        )
    return prompts


def timed_step(engine: LLMEngine) -> float:
    start = time.perf_counter()
    engine.step_requests()
    return time.perf_counter() - start


def run(
    engine: LLMEngine,
    processor: InputProcessor,
    vision: VisionTimer,
    label: str,
    budget: int | None,
    seed: int,
    ahead: EncodeAhead | None = None,
    num_decodes: int = DECODES,
) -> dict:
    """One policy: `budget` None is whole-prompt prefill; `ahead`: images encoded ahead, beside
    the steps (else inside them)."""
    engine.scheduler.set_prefill_policy(budget is not None, budget or WHOLE_BUDGET)
    engine.ahead = ahead
    engine.block_manager.reset_prefix_cache()
    generator = torch.Generator().manual_seed(seed)
    decode_params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    decodes = []
    for i in range(num_decodes):
        ids = torch.randint(10, 600, (1000,), generator=generator).tolist()
        decodes.append(engine.add_request(f"{label}d{i}", processor.process_prompt(ids), decode_params))
    while any(not r.output_token_ids for r in decodes):
        engine.step_requests()
    before = [timed_step(engine) for _ in range(20)]
    prompts = burst(processor, seed)  # before the clock starts: the front end's work is not timed
    burst_params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    vision.take_seconds()
    launch_before = ahead.launch_seconds if ahead is not None else 0.0
    start = time.perf_counter()
    longs = [engine.add_request(f"{label}l{i}", p, burst_params) for i, p in enumerate(prompts)]
    steps, ttft = [], {}
    while len(ttft) < len(longs):
        steps.append(timed_step(engine))  # with encode-ahead, decodes run while the tower does
        for r in longs:
            if r.output_token_ids and r.request_id not in ttft:
                ttft[r.request_id] = time.perf_counter() - start
    for r in decodes + longs:
        engine.abort_request(r.request_id)
    return {
        "policy": label,
        "decode_step_ms": statistics.median(before) * 1e3,
        "steps": len(steps),
        "step_mean_ms": statistics.mean(steps) * 1e3,
        "step_max_ms": max(steps) * 1e3,
        "ttft_first_ms": min(ttft.values()) * 1e3,
        "ttft_last_ms": max(ttft.values()) * 1e3,
        "vision_ms": vision.take_seconds() * 1e3,
        # Host time launching the tower beside the steps (0: inside them, not split out).
        "ahead_launch_ms": ((ahead.launch_seconds - launch_before) * 1e3) if ahead is not None else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-dir", type=Path, default=SHARED_CONFIGS)
    parser.add_argument("--config", default="qwen2_5_vl_7b.json")
    parser.add_argument("--budgets", default="512,1024,2048,4096,8192", help="chunked prefill budgets")
    parser.add_argument(
        "--encode-ahead",
        default="off",
        choices=("off", "on", "both"),
        help="images encoded inside the steps (off), beside them (on: epd.engine.encode_ahead), or both rows",
    )
    parser.add_argument("--decodes", type=int, default=DECODES, help="requests decoding when the burst comes")
    parser.add_argument("--vision-cuda-graphs", action="store_true", help="encode-ahead replays the tower")
    parser.add_argument(
        "--ahead-priority", type=int, default=0, help="encode-ahead stream's CUDA priority (-1: first)"
    )
    parser.add_argument(
        "--switch-interval-ms", type=float, default=None, help="sys.setswitchinterval (the GIL's hand-over)"
    )
    args = parser.parse_args()
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    model = build_model_dir(Path("/tmp/epd-chunked-prefill-model"), args.config_dir, args.config)
    processor = InputProcessor.from_pretrained(str(model))
    engine_args = EngineArgs(
        model=str(model),
        load_format="dummy",
        dtype="bfloat16",
        device="cuda",
        kv_cache_memory_bytes=40 << 30,
        max_model_len=WHOLE_BUDGET,
        max_num_seqs=64,
        encode_ahead=True,
        vision_cuda_graphs=args.vision_cuda_graphs,
    )
    engine = LLMEngine(engine_args.engine_config(), processor.tokenizer)
    vision = VisionTimer(engine.model)
    ahead = engine.ahead  # rows without it set engine.ahead to None
    if args.ahead_priority:
        ahead.close()
        encoder, waiting, graphs = ahead.encoder, ahead.images_waiting, ahead.tower_graphs
        ahead = EncodeAhead(encoder, waiting, ahead.max_images, graphs, stream_priority=args.ahead_priority)
    print("prompt tokens of a burst request:", len(burst(processor, 99)[0].prompt_token_ids))
    run(engine, processor, vision, "warm-up chunked", 2048, 0)
    run(engine, processor, vision, "warm-up whole", None, 50)
    run(engine, processor, vision, "warm-up ahead", 2048, 51, ahead)
    policies = [("whole prompts", None)] + [(f"chunks of {b}", int(b)) for b in args.budgets.split(",")]
    modes = {"off": [None], "on": [ahead], "both": [None, ahead]}[args.encode_ahead]
    policies = [
        (label + (", encoded ahead" if mode is not None else ""), budget, mode)
        for label, budget in policies
        for mode in modes
    ]
    columns = [
        "policy",
        "decode_step_ms",
        "steps",
        "step_mean_ms",
        "step_max_ms",
        "ttft_first_ms",
        "ttft_last_ms",
        "vision_ms",
        "ahead_launch_ms",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for seed, (label, budget, mode) in enumerate(policies, start=1):
        row = run(engine, processor, vision, label, budget, seed, mode, args.decodes)
        print(
            "| "
            + " | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns)
            + " |",
            flush=True,
        )


if __name__ == "__main__":
    main()

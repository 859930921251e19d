"""End to end on one GPU: epd (1EPD, in process) against transformers `generate`, same shapes.

Workloads (64 requests each, every request its own random image, greedy, ignore_eos):
  A: one 896x896 image + 32 text tokens, 128 output tokens;
  B: one 448x448 image + 32 text tokens, 512 output tokens.
epd gets all 64 at once (continuous batching). transformers runs static batches of 1, 16
and 64 back to back; one batch of each size is timed, and the figures for 64 requests
follow from it: throughput = 64 * out / (64/b * T_b); mean TTFT = TTFT_b + T_b * (64/b - 1) / 2
(batch k of the run waits for the k before it), with TTFT_b timed as `generate` of 1 token.
Prompts are processed (images resized and patchified) before the clock starts, for both.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from epd.bench.roofline_setup import sync
from epd.inputs.processor import InputProcessor
from epd.inputs.types import ProcessedPrompt
from epd.sampling_params import SamplingParams
from epd.testing.images import noise_image

# image side, output tokens; the dry run (--dry-run: CPU, tiny model) shrinks them.
WORKLOADS = {"A": (896, 128), "B": (448, 512)}
NUM_REQUESTS = 64
HF_BATCHES = (1, 16, 64)
DEVICE = torch.device("cuda")


def make_prompts(processor: InputProcessor, side: int, n: int, seed: int) -> list[ProcessedPrompt]:
    """n prompts of 32 text tokens (vision start/pad/end + 29 others) around one image each."""
    tok = processor.tokenizer
    start, pad, end = (tok.token_to_id(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"))
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(n):
        text = torch.randint(0, 600, (29,), generator=gen).tolist()
        ids = text[:8] + [start, pad, end] + text[8:]
        image = noise_image(side, side, seed=seed * 1000 + i)
        prompts.append(
            processor.process_prompt({"prompt_token_ids": ids, "multi_modal_data": {"image": image}})
        )
    return prompts


def run_epd(engine, prompts: list[ProcessedPrompt], max_tokens: int, tag: str) -> dict[str, float]:
    """All prompts at once, stepped to the end. `decode_step_ms`: the median step of those that
    ran the whole batch as pure decodes (the steady state), host work included."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.time()
    requests = [engine.add_request(f"{tag}{i}", p, params, arrival_time=start) for i, p in enumerate(prompts)]
    full_decode_steps = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        advanced = engine.step_requests()
        if len(advanced) == len(requests) and engine.last_batch_tokens == len(requests):
            full_decode_steps.append(time.perf_counter() - t0)
    elapsed = time.time() - start
    tokens = sum(len(r.output_token_ids) for r in requests)
    ttfts = [r.metrics.first_token_time - r.arrival_time for r in requests]
    step_ms = statistics.median(full_decode_steps) * 1e3 if full_decode_steps else float("nan")
    return dict(seconds=elapsed, out_tok_s=tokens / elapsed, ttft_mean_s=statistics.mean(ttfts),
                ttft_p50_s=statistics.median(ttfts), tokens=tokens, decode_step_ms=step_ms)  # fmt: skip


def load_hf(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The same architecture in transformers: bf16, SDPA attention, random weights, on the GPU."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir)
    with DEVICE:
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


@torch.inference_mode()
def hf_generate(hf, prompts: list[ProcessedPrompt], max_tokens: int) -> float:
    """Seconds for one static batch (all prompts have the same length and image size)."""
    dtype = next(hf.parameters()).dtype
    ids = torch.tensor([p.prompt_token_ids for p in prompts], device=DEVICE)
    pixels = torch.cat([img.pixel_values for p in prompts for img in p.images]).to(DEVICE, dtype)
    grids = torch.tensor([img.grid_thw for p in prompts for img in p.images], device=DEVICE)
    sync()
    start = time.perf_counter()
    hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixels,
        image_grid_thw=grids,
        mm_token_type_ids=(ids == hf.config.image_token_id).int(),
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    sync()
    return time.perf_counter() - start


def bench_e2e(
    model_dir: Path, make_engine: Callable[[], object], record: Callable[..., None], dtype: torch.dtype
) -> None:
    """epd twice (other prompts the second time: the run-to-run spread), then transformers."""
    processor = InputProcessor.from_pretrained(str(model_dir))
    prompts = {
        name: make_prompts(processor, side, NUM_REQUESTS, seed=1) for name, (side, _) in WORKLOADS.items()
    }
    warm = {
        name: make_prompts(processor, side, NUM_REQUESTS, seed=2) for name, (side, _) in WORKLOADS.items()
    }
    engine = make_engine()
    for name, (_, out) in WORKLOADS.items():
        run_epd(engine, warm[name], 3, f"warm{name}")  # compiles kernels, captures the batch's graph
        record("e2e", f"{name} epd", **run_epd(engine, prompts[name], out, name))
        again = make_prompts(processor, WORKLOADS[name][0], NUM_REQUESTS, 3)
        record("e2e", f"{name} epd run 2", **run_epd(engine, again, out, f"again{name}"))
    del engine
    gc.collect()  # the engine holds reference cycles (scheduler -> engine callbacks)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    hf = load_hf(model_dir, dtype)
    for name, (_, out) in WORKLOADS.items():
        hf_generate(hf, warm[name][:2], 2)
        for b in HF_BATCHES:
            ttft_b = hf_generate(hf, prompts[name][:b], 1)
            total_b = hf_generate(hf, prompts[name][:b], out)
            runs = NUM_REQUESTS // b
            record("e2e", f"{name} transformers b{b}", batch_seconds=total_b, ttft_batch_s=ttft_b,
                   out_tok_s=NUM_REQUESTS * out / (runs * total_b),
                   ttft_mean_s=ttft_b + total_b * (runs - 1) / 2)  # fmt: skip

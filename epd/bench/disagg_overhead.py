"""Per-request cost of disaggregation: `1EPD` vs `1E+1P+1D` (and other variants), one run, side by side.

    python -m epd.bench.disagg_overhead [--model DIR] [--requests 16] [--max-tokens 16]
    python -m epd.bench.disagg_overhead --model DIR --load-format dummy --dtype bfloat16 \\
        --devices cuda:0,cuda:1,cuda:2 --images 4 --image-side 1344 --max-tokens 8 \\
        --variants 1EPD,1E+1P+1D:cuda_ipc:layer,1E+1P+1D:cuda_ipc:request --json OUT/kv.json

Requests run one at a time (no batching effects), each with new images, so the difference in
end-to-end latency is the price of the process boundary: control messages, the embedding transfer
E -> P and the KV hand-off P -> D. `to_encode` runs from the request's arrival to the start of its
first encode: with encoder instances, what control messages cost before encoding starts (once a
round trip through P, which asked for its images; now one message from the router to E). The
lifetime breakdown shows where the rest of the time goes; on GPUs,
`kv_transfer` (first token on P -> KV usable on D) compares layer-wise KV streaming with sending
the KV after prefill. A variant is `LAYOUT[:TRANSFER[:KV_STREAMING]]`; instances take the devices
of --devices in order (a tensor-parallel instance one per rank).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from epd import LLM, SamplingParams
from epd.cluster.layout import Layout
from epd.lifetime import Event
from epd.testing.images import noise_image

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
STAGES = ("encode_queue", "encode", "mm_transfer", "prefill_queue", "prefill", "kv_transfer", "decode")
CPU_VARIANTS = "1EPD,1E+1P+1D:shm,1E+1P+1D:tcp"


def prompt(i: int, images: int, side: int) -> dict:
    pictures = [noise_image(side, side, seed=1000 + i * images + j) for j in range(images)]  # all new
    text = f"<|im_start|>user\n{IMAGE * images}Describe image {i}.<|im_end|>\n"
    return {"prompt": text, "multi_modal_data": {"image": pictures}}


def run(model: str, variant: str, args: argparse.Namespace) -> dict[str, float]:
    layout, transfer, kv_streaming = (variant.split(":") + ["auto", "auto"])[:3]
    devices = args.devices.split(",")[: Layout.parse(layout).num_devices] if args.devices else None
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    options = dict(layout=layout, transfer=transfer, kv_streaming=kv_streaming, dtype=args.dtype)
    options.update(load_format=args.load_format, max_model_len=args.max_model_len, devices=devices)
    options.update(kv_cache_memory_bytes=args.kv_cache_gib << 30, mm_cache_bytes=args.mm_cache_gib << 30)
    with LLM(model, **options) as llm:
        llm.generate([prompt(-1, args.images, args.image_side)], params, use_tqdm=False)  # warm-up
        e2e, ttft, to_encode, stages = [], [], [], {s: [] for s in STAGES}
        for i in range(args.requests):
            start = time.perf_counter()
            [out] = llm.generate([prompt(i, args.images, args.image_side)], params, use_tqdm=False)
            assert out.error is None, out.error
            e2e.append(time.perf_counter() - start)
            ttft.append(out.metrics.first_token_time - out.metrics.arrival_time)
            to_encode.append(encode_start(out.metrics.events) - out.metrics.arrival_time)
            for stage, seconds in out.metrics.breakdown().items():
                stages[stage].append(seconds)
    result = {"e2e_ms": statistics.mean(e2e) * 1e3, "ttft_ms": statistics.mean(ttft) * 1e3}
    result["to_encode_ms"] = statistics.mean(to_encode) * 1e3
    result.update({f"{s}_ms": statistics.mean(v) * 1e3 for s, v in stages.items() if v})
    return result


def encode_start(events: list) -> float:
    """When the request's first image started encoding (wherever that was)."""
    return min(e.time for e in events if e.event is Event.ENCODE_START)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (default: a tiny random checkpoint)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--variants", default=CPU_VARIANTS, help="LAYOUT[:TRANSFER[:KV_STREAMING]],...")
    parser.add_argument("--devices", default=None, help="devices in instance order, e.g. cuda:0,cuda:1")
    parser.add_argument("--images", type=int, default=1, help="new images per request")
    parser.add_argument("--image-side", type=int, default=224)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--load-format", default="safetensors")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument("--mm-cache-gib", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from epd.testing.checkpoints import build_tiny_checkpoint

        model = str(build_tiny_checkpoint(tempfile.mkdtemp(prefix="epd-bench-"), "qwen2_5_vl"))
    rows = [(variant, run(model, variant, args)) for variant in args.variants.split(",")]
    columns = ["e2e_ms", "ttft_ms", "to_encode_ms"] + [f"{s}_ms" for s in STAGES]
    print(
        f"{args.requests} sequential requests, {args.images} new {args.image_side}px image(s) each, "
        f"{args.max_tokens} output tokens; mean ms"
    )
    print("| variant | " + " | ".join(c[:-3] for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, result in rows:
        print(f"| {name} | " + " | ".join(f"{result[c]:.1f}" if c in result else "-" for c in columns) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": dict(rows)}, f, indent=2)


if __name__ == "__main__":
    main()

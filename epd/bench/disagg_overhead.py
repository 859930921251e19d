"""Per-request cost of disaggregation on the CPU: `1EPD` vs `1E+1P+1D`, one run, side by side.

    python -m epd.bench.disagg_overhead [--model DIR] [--requests 16] [--max-tokens 16]

Requests run one at a time (no batching effects), each with one image, so the difference
in end-to-end latency is the price of the process boundary: control messages, the
embedding transfer E -> P and the KV hand-off P -> D. The lifetime breakdown shows where
the time goes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from epd import LLM, SamplingParams
from epd.testing.images import noise_image

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
STAGES = ("encode_queue", "encode", "mm_transfer", "prefill_queue", "prefill", "kv_transfer", "decode")


def run(model: str, layout: str, transfer: str, n: int, max_tokens: int) -> dict[str, float]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with LLM(model, layout=layout, transfer=transfer) as llm:
        warm = {
            "prompt": f"<|im_start|>user\n{IMAGE}warm up<|im_end|>\n",
            "multi_modal_data": {"image": noise_image(64, 64, 0)},
        }
        llm.generate([warm], params, use_tqdm=False)
        e2e, ttft, stages = [], [], {s: [] for s in STAGES}
        for i in range(n):
            image = noise_image(224, 224, seed=1000 + i)  # a new image each time: no cache hits
            prompt = {
                "prompt": f"<|im_start|>user\n{IMAGE}Describe image {i}.<|im_end|>\n",
                "multi_modal_data": {"image": image},
            }
            start = time.perf_counter()
            [out] = llm.generate([prompt], params, use_tqdm=False)
            e2e.append(time.perf_counter() - start)
            ttft.append(out.metrics.first_token_time - out.metrics.arrival_time)
            for stage, seconds in out.metrics.breakdown().items():
                stages[stage].append(seconds)
    result = {"e2e_ms": statistics.mean(e2e) * 1e3, "ttft_ms": statistics.mean(ttft) * 1e3}
    result.update({f"{s}_ms": statistics.mean(v) * 1e3 for s, v in stages.items() if v})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    model = args.model
    if model is None:
        from epd.testing.checkpoints import build_tiny_checkpoint

        model = str(build_tiny_checkpoint(tempfile.mkdtemp(prefix="epd-bench-"), "qwen2_5_vl"))
    rows = [
        ("1EPD (in-process)", run(model, "1EPD", "shm", args.requests, args.max_tokens)),
        ("1E+1P+1D shm", run(model, "1E+1P+1D", "shm", args.requests, args.max_tokens)),
        ("1E+1P+1D tcp", run(model, "1E+1P+1D", "tcp", args.requests, args.max_tokens)),
    ]
    columns = ["e2e_ms", "ttft_ms"] + [f"{s}_ms" for s in STAGES]
    print(f"{args.requests} sequential requests, one 224x224 image, {args.max_tokens} output tokens; mean ms")
    print("| layout | " + " | ".join(c[:-3] for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, result in rows:
        print(f"| {name} | " + " | ".join(f"{result[c]:.1f}" if c in result else "-" for c in columns) + " |")


if __name__ == "__main__":
    main()

"""Offline generation throughput: epd's batched engine vs transformers, one run, side by side.

    python -m epd.bench.offline_throughput [--model DIR] [--batch 16] [--max-tokens 64]

Without --model it builds the tiny random Qwen2.5-VL test checkpoint. Every request
generates exactly --max-tokens tokens (ignore_eos) so both sides do the same work.
transformers runs the requests one at a time (its generate() does not batch prompts of
different images and lengths without padding them); epd runs them as one batch.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch

from epd import LLM, SamplingParams
from epd.testing.images import noise_image

WORDS = "describe the picture and count the red cars near the green tree in the morning".split()


def make_prompts(n: int, seed: int) -> list:
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))
        k = rng.choice([0, 1, 1, 2])
        pads = "<|vision_start|><|image_pad|><|vision_end|>" * k
        prompt = f"<|im_start|>user\n{pads}{text}<|im_end|>\n<|im_start|>assistant\n"
        sizes = [(rng.randint(112, 336), rng.randint(112, 336)) for _ in range(k)]
        images = [noise_image(w, h, seed=i * 10 + j) for j, (w, h) in enumerate(sizes)]
        prompts.append({"prompt": prompt, "multi_modal_data": {"image": images}})
    return prompts


def bench_epd(model: str, prompts: list, params: SamplingParams) -> tuple[float, int]:
    with LLM(model) as llm:
        llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def bench_transformers(model: str, prompts: list, max_tokens: int) -> tuple[float, int]:
    from epd.inputs.processor import InputProcessor
    from epd.testing.reference import load_hf_model

    hf, processor = load_hf_model(model), InputProcessor.from_pretrained(model)
    processed = [processor.process_prompt(p) for p in prompts]
    start, total = time.perf_counter(), 0
    for p in processed:
        ids = torch.tensor([p.prompt_token_ids])
        mm = {}
        if p.images:
            mm = dict(
                pixel_values=torch.cat([i.pixel_values for i in p.images]),
                image_grid_thw=torch.tensor([i.grid_thw for i in p.images]),
                mm_token_type_ids=(ids == hf.config.image_token_id).int(),
            )
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                **mm,
            )
        total += out.shape[1] - ids.shape[1]
    return time.perf_counter() - start, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = args.model
    if model is None:
        from epd.testing.checkpoints import build_tiny_checkpoint

        model = str(build_tiny_checkpoint(tempfile.mkdtemp(prefix="epd-bench-"), "qwen2_5_vl"))
    prompts = make_prompts(args.batch, args.seed)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    epd_s, epd_tokens = bench_epd(model, prompts, params)
    hf_s, hf_tokens = bench_transformers(model, prompts, args.max_tokens)
    print(f"device cpu, {torch.get_num_threads()} threads, batch {args.batch}, {args.max_tokens} tokens each")
    print(f"epd          {epd_tokens} tokens in {epd_s:.2f} s = {epd_tokens / epd_s:8.1f} tokens/s")
    print(
        f"transformers {hf_tokens} tokens in {hf_s:.2f} s = {hf_tokens / hf_s:8.1f} tokens/s, one at a time"
    )
    print(f"ratio epd / transformers: {(epd_tokens / epd_s) / (hf_tokens / hf_s):.2f}x")


if __name__ == "__main__":
    main()

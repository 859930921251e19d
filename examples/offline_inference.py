"""Offline generation with epd's vLLM-style API.

    python examples/offline_inference.py [--model DIR]

Without --model it builds a tiny random-weight Qwen2.5-VL checkpoint in a temporary
directory (no download), so the output text is gibberish but every stage is real:
chat template, image preprocessing, vision tower, paged KV cache, continuous batching.
"""

from __future__ import annotations

import argparse
import base64
import io
import tempfile

from epd import LLM, SamplingParams
from epd.testing.images import noise_image


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="local Hugging Face Qwen2-VL / Qwen2.5-VL directory")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from epd.testing.checkpoints import build_tiny_checkpoint

        model = str(build_tiny_checkpoint(tempfile.mkdtemp(prefix="epd-tiny-"), "qwen2_5_vl"))
        print(f"built a tiny random-weight checkpoint in {model}")
    conversations = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(noise_image(320, 240, seed=1))}},
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
        [{"role": "user", "content": "Write one sentence about the sea."}],
    ]
    with LLM(model, device=args.device) as llm:
        for out in llm.chat(conversations, SamplingParams(temperature=0, max_tokens=24)):
            print(
                f"[{out.request_id}] {len(out.prompt_token_ids)} prompt tokens -> "
                f"{out.outputs[0].finish_reason}: {out.outputs[0].text!r}"
            )


if __name__ == "__main__":
    main()

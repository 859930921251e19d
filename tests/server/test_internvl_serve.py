"""`epd serve` of an InternVL ("-hf") checkpoint in 1E+1P+1D: the openai client's image_url parts
go through InternVL's chat template, the front end sizes the images from their headers, the
encoder instance decodes and tiles them, and the answer is transformers' own, token for token."""

from __future__ import annotations

import base64
import io

import openai

from epd.testing.checkpoints import build_tiny_internvl_checkpoint, hf_internvl_processor
from epd.testing.images import noise_image
from epd.testing.reference import hf_greedy, load_hf_model

from .helpers import ServerProcess

ARGS = ["--layout", "1E+1P+1D", "--max-model-len", "1024", "--num-kv-blocks", "256"]


def png_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_openai_client_images_give_transformers_answer(tmp_path):
    checkpoint = build_tiny_internvl_checkpoint(tmp_path / "internvl")
    images = [noise_image(300, 100, seed=1), noise_image(90, 200, seed=2)]  # 3 + 1 tiles, 2 + 1
    question = {"type": "text", "text": "What is different between these?"}
    parts = [{"type": "image_url", "image_url": {"url": png_url(img)}} for img in images]
    server = ServerProcess(["--model", str(checkpoint), *ARGS], tmp_path / "serve.log").start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=120, max_retries=0)
        reply = client.chat.completions.create(
            model=str(checkpoint),
            messages=[{"role": "user", "content": [*parts, question]}],
            max_tokens=8,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    processor = hf_internvl_processor(checkpoint)
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, question]}]
    text = processor.tokenizer.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    expected, _ = hf_greedy(load_hf_model(checkpoint), ids, 8, pixel_values=inputs["pixel_values"])
    body = reply.model_dump()
    assert body["prompt_token_ids"] == ids
    assert body["choices"][0]["token_ids"] == expected

"""/v1/chat/completions through the official openai client, against the offline API."""

from __future__ import annotations

import openai
import pytest

from epd import LLM, SamplingParams
from epd.inputs.processor import InputProcessor
from epd.testing.images import noise_image

from .conftest import MODEL_NAME
from .helpers import data_url, encode_image, image_message

ONE_IMAGE = image_message("What is in this image?", 1)
THREE_IMAGES = image_message("Compare these images.", 2, 3, 4)


@pytest.fixture(scope="module")
def llm(model: str):
    with LLM(model) as llm:
        yield llm


@pytest.fixture(scope="module")
def processor(model: str) -> InputProcessor:
    return InputProcessor.from_pretrained(model)


def chat(client: openai.OpenAI, messages: list[dict], **kwargs):
    return client.chat.completions.create(model=MODEL_NAME, messages=messages, **kwargs)


def stream_chat(client: openai.OpenAI, messages: list[dict], **kwargs) -> tuple[str, list]:
    chunks = list(chat(client, messages, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


@pytest.mark.parametrize("messages", [ONE_IMAGE, THREE_IMAGES], ids=["one_image", "three_images"])
def test_chat_usage_counts_image_tokens(client, processor, messages):
    resp = chat(client, messages, max_tokens=6, temperature=0)
    prompt = processor.process_chat(messages)
    assert len(prompt.images) == len(messages[0]["content"]) - 1
    assert resp.usage.prompt_tokens == len(prompt.prompt_token_ids)  # image placeholders included
    assert resp.usage.completion_tokens <= 6
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.choices[0].message.role == "assistant"


@pytest.mark.parametrize("messages", [ONE_IMAGE, THREE_IMAGES], ids=["one_image", "three_images"])
def test_return_token_ids_match_offline(client, llm, messages):
    params = SamplingParams(temperature=0, max_tokens=12)
    [ref] = llm.chat(messages, params, use_tqdm=False)
    resp = chat(client, messages, max_tokens=12, temperature=0, extra_body={"return_token_ids": True})
    assert resp.prompt_token_ids == ref.prompt_token_ids
    assert resp.choices[0].token_ids == ref.outputs[0].token_ids
    assert resp.choices[0].message.content == ref.outputs[0].text


def test_streaming_matches_non_streaming(client):
    kwargs = dict(max_tokens=10, temperature=0, extra_body={"return_token_ids": True})
    full = chat(client, THREE_IMAGES, **kwargs)
    text, chunks = stream_chat(client, THREE_IMAGES, stream_options={"include_usage": True}, **kwargs)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].prompt_token_ids == full.prompt_token_ids
    streamed_ids = [t for c in chunks if c.choices for t in (c.choices[0].token_ids or [])]
    assert streamed_ids == full.choices[0].token_ids
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_logprobs_match_offline(client, llm):
    [ref] = llm.chat(ONE_IMAGE, SamplingParams(temperature=0, max_tokens=5, logprobs=3), use_tqdm=False)
    resp = chat(client, ONE_IMAGE, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == len(ref.outputs[0].token_ids)
    for entry, token_id, position in zip(content, ref.outputs[0].token_ids, ref.outputs[0].logprobs):
        assert entry.logprob == pytest.approx(position[token_id].logprob, abs=1e-4)
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-6)  # greedy picks the most likely
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_seed_makes_sampling_reproducible(client):
    kwargs = dict(max_tokens=12, temperature=1.0, seed=1234)
    first = chat(client, ONE_IMAGE, **kwargs).choices[0].message.content
    second = chat(client, ONE_IMAGE, **kwargs).choices[0].message.content
    assert first == second
    streamed, _ = stream_chat(client, ONE_IMAGE, **kwargs)
    assert streamed == first


def test_stop_string_cuts_the_text(client):
    full = chat(client, ONE_IMAGE, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    stop = next(text[i : i + 2] for i in range(3, len(text) - 1) if text[i : i + 2].strip())
    expected = text[: text.index(stop)]
    resp = chat(client, ONE_IMAGE, max_tokens=16, temperature=0, stop=["NEVER-SEEN", stop])
    assert resp.choices[0].message.content == expected
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].stop_reason == stop  # vLLM's extension
    streamed, _ = stream_chat(client, ONE_IMAGE, max_tokens=16, temperature=0, stop=stop)
    assert streamed == expected


def test_epd_timings_break_down_every_stage(client):
    fresh = image_message("describe", 99)  # an image seen before would skip the encoder (cache hit)
    resp = chat(client, fresh, max_tokens=4, temperature=0, extra_body={"epd_timings": True})
    timings = resp.epd_timings
    assert set(timings["stages"]) >= {"encode", "mm_transfer", "prefill", "kv_transfer", "decode"}
    assert 0 < timings["ttft"] <= timings["e2e"]
    assert all(v >= 0 for v in timings["stages"].values())


def test_local_media_only_under_the_allowed_directory(client, media_dir):
    inside = [{"type": "image_url", "image_url": {"url": f"file://{media_dir}/allowed.png"}}]
    resp = chat(
        client, [{"role": "user", "content": [*inside, {"type": "text", "text": "hi"}]}], max_tokens=2
    )
    assert resp.usage.prompt_tokens > 20
    for url in ("file:///etc/hostname", f"file://{media_dir}/../../etc/hostname", "/etc/hostname"):
        part = {"type": "image_url", "image_url": {"url": url}}
        with pytest.raises(openai.BadRequestError):
            chat(client, [{"role": "user", "content": [part]}], max_tokens=2)


def animated_gif() -> bytes:
    frames = [noise_image(48, 40, seed=s).convert("P") for s in (21, 22)]
    return encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_image_formats(client, llm, fmt):
    data = animated_gif() if fmt == "GIF" else encode_image(noise_image(48, 40, seed=20), fmt)
    part = {"type": "image_url", "image_url": {"url": data_url(data, f"image/{fmt.lower()}")}}
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "what is it?"}]}]
    [ref] = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    resp = chat(client, messages, max_tokens=4, temperature=0)
    assert resp.choices[0].message.content == ref.outputs[0].text  # same decoding, first frame for GIF

"""Image files travel to the instance that encodes them, which decodes them (epd.inputs.patches).

Real instance processes. What is checked: files give the tokens the in-process engine gives for
the same files (and for the same images passed as pixels); a file that is broken past its header
(accepted by the front end, which reads only the header) fails its own request with an input
error, everywhere it is decoded, while the requests beside it, and a later one with the same
file, end as they should (none waits for an embedding that will never come).
"""

from __future__ import annotations

import io

import pytest

from epd import LLM, SamplingParams
from epd.testing.images import noise_image

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PARAMS = SamplingParams(temperature=0, max_tokens=6)


def png(seed: int, width: int = 120, height: int = 90) -> bytes:
    out = io.BytesIO()
    noise_image(width, height, seed=seed).save(out, format="PNG")
    return out.getvalue()


def jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    noise_image(100, 140, seed=seed).save(out, format="JPEG", quality=85)
    return out.getvalue()


def prompt(*images: bytes, text: str = "what is this") -> dict:
    body = f"<|im_start|>user\n{IMAGE * len(images)}{text}<|im_end|>\n<|im_start|>assistant\n"
    return {"prompt": body, "multi_modal_data": {"image": list(images)}}


def broken(data: bytes) -> bytes:
    """The header whole, the pixel data cut: the front end accepts it, a decoder does not."""
    return data[: len(data) // 2]


@pytest.fixture(scope="module")
def model(checkpoints):
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def good_requests():
    shared = png(7)
    return [prompt(png(1)), prompt(jpeg(2), png(3)), prompt(shared), prompt(shared, png(4, 60, 200))]


@pytest.fixture(scope="module")
def reference(model, good_requests):
    with LLM(model) as llm:
        return llm.generate(good_requests, PARAMS, use_tqdm=False)


@pytest.mark.parametrize("layout", ["1E+1P+1D", "1EP+1D", "2E+1PD"])
def test_files_decoded_where_encoded_give_the_in_process_tokens(model, good_requests, reference, layout):
    bad = prompt(broken(png(5)))
    mixed = [bad, *good_requests, bad]  # the same bad file twice: the second must not wait forever
    with LLM(model, layout=layout) as llm:
        outputs = llm.generate(mixed, PARAMS, use_tqdm=False)
        after = llm.generate(good_requests[:1], PARAMS, use_tqdm=False)  # the cluster still serves
    for out in (outputs[0], outputs[-1]):
        assert out.error is not None and out.invalid_input, out.error
        assert "truncated or corrupt" in out.error
    for out, ref in zip(outputs[1:-1], reference, strict=True):
        assert out.error is None, out.error
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert after[0].outputs[0].token_ids == reference[0].outputs[0].token_ids


def test_in_process_engine_refuses_a_broken_file_before_it_runs(model, good_requests, reference):
    from epd.inputs.errors import InvalidInputError

    with LLM(model) as llm:
        with pytest.raises(InvalidInputError, match="truncated or corrupt"):
            llm.generate([prompt(broken(png(5)))], PARAMS, use_tqdm=False)
        again = llm.generate(good_requests[:1], PARAMS, use_tqdm=False)
    assert again[0].outputs[0].token_ids == reference[0].outputs[0].token_ids


def test_files_and_pixels_of_the_same_image_give_the_same_tokens(model):
    image = noise_image(130, 70, seed=11)
    out = io.BytesIO()
    image.save(out, format="PNG")
    with LLM(model, layout="1E+1P+1D") as llm:
        as_file, as_pixels = llm.generate([prompt(out.getvalue()), prompt(image)], PARAMS, use_tqdm=False)
    assert as_file.error is None and as_pixels.error is None
    assert as_file.outputs[0].token_ids == as_pixels.outputs[0].token_ids

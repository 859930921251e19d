"""Every layout gives the same tokens (and logprobs) as the aggregated engine.

Real instance processes, real sockets, both CPU connectors; images as files (decoded by the
instance that encodes them) and as pixels. The reference is the
in-process `1EPD` engine, itself token-exact against transformers (tests/entrypoints).
"""

from __future__ import annotations

import io
import random
import time

import pytest

from epd import LLM, SamplingParams
from epd.lifetime import Event
from epd.testing.images import noise_image

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
WORDS = "describe count compare the red car green tree two people river morning sun".split()
PARAMS = SamplingParams(temperature=0, max_tokens=8, logprobs=2)


def mixed_requests(n: int, seed: int) -> list:
    """n prompts with 0 to 4 images of different sizes; a few images repeat across requests."""
    rng = random.Random(seed)
    shared = noise_image(150, 110, seed=seed * 1000)
    prompts = []
    for i in range(n):
        k = rng.randint(0, 4)
        images = [
            noise_image(rng.randint(56, 220), rng.randint(56, 220), seed=seed * 1000 + i * 7 + j + 1)
            for j in range(k)
        ]
        if k and rng.random() < 0.25:
            images[0] = shared
        # Half the images as files, which the encoding instance decodes (the other half travel
        # as patches): both paths in every layout.
        images = [as_png(img) if rng.random() < 0.5 else img for img in images]
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 20)))
        prompt = f"<|im_start|>user\n{IMAGE * k}{text}<|im_end|>\n<|im_start|>assistant\n"
        prompts.append({"prompt": prompt, "multi_modal_data": {"image": images}} if k else prompt)
    return prompts


def as_png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def model(checkpoints):
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def requests():
    return mixed_requests(32, seed=1)


@pytest.fixture(scope="module")
def reference(model, requests):
    with LLM(model) as llm:
        return llm.generate(requests, PARAMS, use_tqdm=False)


def assert_same(outputs, reference) -> None:
    for out, ref in zip(outputs, reference):
        assert out.error is None, out.error
        assert out.prompt_token_ids == ref.prompt_token_ids
        got, want = out.outputs[0], ref.outputs[0]
        assert got.token_ids == want.token_ids
        assert got.text == want.text and got.finish_reason == want.finish_reason
        for position, ref_position in zip(got.logprobs, want.logprobs):
            assert position.keys() == ref_position.keys()
            for token, lp in position.items():
                assert lp.logprob == pytest.approx(ref_position[token].logprob, abs=1e-5)


LAYOUTS = ["2EP+1D", "1E+1PD", "1E+1P+1D", "2E+1P+2D", "3E+2P+1D"]


@pytest.mark.parametrize("transfer", ["shm", "tcp"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_match_aggregated(model, requests, reference, layout, transfer):
    with LLM(model, layout=layout, transfer=transfer) as llm:
        outputs = llm.generate(requests, PARAMS, use_tqdm=False)
    assert_same(outputs, reference)


@pytest.mark.parametrize("layout", ["2EPD", "1EP+1D"])
def test_instances_encoding_ahead_match_aggregated(model, requests, reference, layout):
    """--encode-ahead in instance processes (epd.engine.encode_ahead): the images of each request
    are encoded before its prefill starts, not inside it, and the tokens are the same."""
    with LLM(model, layout=layout, encode_ahead=True) as llm:
        outputs = llm.generate(requests, PARAMS, use_tqdm=False)
    assert_same(outputs, reference)
    with_images = [out for out in outputs if encode_events(out)]
    assert with_images
    for out in with_images:
        times = {}
        for e in out.metrics.events:
            times.setdefault(e.event, []).append(e.time)
        assert max(times[Event.ENCODE_END]) <= min(times[Event.PREFILL_START])


def test_weights_are_split_by_role(model):
    with LLM(model, layout="1E+1P+1D") as llm:
        ready = {name: h.ready for name, h in llm.engine.router.instances.items()}
    assert ready["E0"].vision_parameters > 0 and ready["E0"].language_parameters == 0
    for name in ("P0", "D0"):
        assert ready[name].vision_parameters == 0 and ready[name].language_parameters > 0


def encode_events(output) -> list:
    return [e for e in output.metrics.events if e.event is Event.ENCODE_START]


def test_images_of_one_request_spread_over_encoders(model):
    images = [noise_image(200, 200, seed=70 + i) for i in range(4)]
    prompt = {
        "prompt": f"<|im_start|>user\n{IMAGE * 4}Compare.<|im_end|>\n",
        "multi_modal_data": {"image": images},
    }
    with LLM(model, layout="2E+1P+1D") as llm:
        [out] = llm.generate([prompt], PARAMS, use_tqdm=False)
    assert out.error is None
    assert {e.instance for e in encode_events(out)} == {"E0", "E1"}
    assert sorted(e.item for e in encode_events(out)) == [0, 1, 2, 3]
    stages = out.metrics.breakdown()
    assert {"encode", "mm_transfer", "prefill", "kv_transfer", "decode"} <= stages.keys()


def test_repeated_and_concurrent_images_are_encoded_once(model):
    image, other = noise_image(180, 120, seed=90), noise_image(120, 180, seed=91)

    def request(text, *imgs):
        return {
            "prompt": f"<|im_start|>user\n{IMAGE * len(imgs)}{text}<|im_end|>\n",
            "multi_modal_data": {"image": list(imgs)},
        }

    with LLM(model, layout="1E+2P+1D") as llm:
        router = llm.engine.router
        # Two requests in flight with the same new image: one encoding between them.
        both = llm.generate([request("first", image), request("second", image)], PARAMS, use_tqdm=False)
        encodings = {(e.instance, e.time) for out in both for e in encode_events(out)}
        assert len(encodings) == 1
        # Seen before: served from a cache (the prefill instance's or the encoder's), not encoded again.
        hits_before = router.stats["encode_cache_hits"]
        again = llm.generate(
            [request("third", image), request("fourth", image, other)], PARAMS, use_tqdm=False
        )
        new_encodings = {(e.instance, e.time) for out in again for e in encode_events(out)} - encodings
        assert len(new_encodings) == 1  # only `other`
        assert all(out.error is None for out in both + again)
        assert router.stats["encode_cache_hits"] >= hits_before


def test_seeded_sampling_continues_on_the_decode_instance(model, requests):
    # The prefill instance samples the first token, the decode instance the rest: the per-request
    # generator state travels with the KV, so the draws are the aggregated engine's.
    seeded = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=8, seed=100 + i) for i in range(8)]
    with LLM(model) as llm:
        want = llm.generate(requests[:8], seeded, use_tqdm=False)
    with LLM(model, layout="1E+1P+1D", kv_streaming="layer") as llm:
        got = llm.generate(requests[:8], seeded, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


@pytest.mark.parametrize("layout", ["1E+1P+1D", "1E+1PD"])
def test_async_scheduling_in_instances_gives_the_aggregated_tokens(model, requests, reference, layout):
    """--async-scheduling in instance processes: the decoding instance (D fed hand-offs, or PD)
    launches decode steps before it reads the last one's tokens; the outputs are the synchronous
    1EPD's (logprobs to 1e-5: a wasted row may change a batch's shape, hence its rounding).

    Whether the mixed batch overlaps any step depends on when its hand-offs arrive (a step is not
    continued while a request waits); a request decoding alone afterwards always does."""
    with LLM(model, layout=layout, transfer="shm", async_scheduling=True) as llm:
        outputs = llm.generate(requests, PARAMS, use_tqdm=False)
        alone = f"<|im_start|>user\n{' '.join(WORDS)}<|im_end|>\n<|im_start|>assistant\n"
        llm.generate([alone], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
        decoder = next(name for name in llm.engine.instance_stats() if name.endswith("D0"))
        overlapped = _reported_stat(llm, decoder, "overlapped_steps_total")
    assert_same(outputs, reference)
    assert overlapped > 0


def _reported_stat(llm: LLM, instance: str, name: str, deadline_s: float = 60.0) -> float:
    """`name` as `instance` reports it, once it reports it above 0 (stats come with its heartbeats);
    0 if it has not by the deadline (a bound on a failure, not a wait for time to pass)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        llm.engine.poll_idle()  # idle, the router reads the instances' reports only when polled
        value = llm.engine.instance_stats().get(instance, {}).get(name, 0.0)
        if value > 0:
            return value
        time.sleep(0.05)
    return 0.0

"""The cheap limits in front of pydantic and the tokenizer, without a server: JSON shape,
prompt text bound, the default pixel limit."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import pytest
import tokenizers

from epd.server.config import default_max_image_pixels
from epd.server.errors import APIError
from epd.server.protocol import ChatCompletionRequest, CompletionRequest
from epd.server.shape import CHAT, COMPLETION, MAX_CONTENT_PARTS, MAX_MESSAGES, check_shape
from epd.server.text_bound import TextBound, chat_text_chars, max_chars_per_token

MAX_MODEL_LEN = 1024


def refusal(body: object, shape=CHAT) -> APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(APIError) as err:
        check_shape(raw, shape, MAX_MODEL_LEN)
    assert err.value.status == 400
    return err.value


def user(content: object) -> dict:
    return {"role": "user", "content": content}


TEXT = {"type": "text", "text": "hi"}
IMAGE = {"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}}


@pytest.mark.parametrize(
    "body, shape",
    [
        ({"messages": [user("hi")] * MAX_MESSAGES, "stop": ["a"], "stream_options": None}, CHAT),
        ({"messages": [user([TEXT, IMAGE] * (MAX_CONTENT_PARTS // 4))] * 2, "logit_bias": {}}, CHAT),
        ({"messages": [user("x" * 100_000)], "response_format": {"type": "text"}}, CHAT),
        ({"prompt": list(range(MAX_MODEL_LEN - 1)), "stop_token_ids": [1] * 1024}, COMPLETION),
        ({"prompt": [list(range(10))]}, COMPLETION),
        ({"prompt": ["text, with, commas " * 1000]}, COMPLETION),
    ],
)
def test_valid_bodies_pass_and_stay_valid(body, shape):
    raw = b"  " + json.dumps(body).encode() + b"\n"
    check_shape(raw, shape, MAX_MODEL_LEN)
    (ChatCompletionRequest if shape is CHAT else CompletionRequest).model_validate_json(raw)


def test_counts_past_the_limits_are_refused_with_the_limit_named():
    assert refusal({"messages": [user("w")] * (MAX_MESSAGES + 1)}).param == "messages"
    many_ints = b'{"messages": [' + b",".join([b"5"] * 1_000_000) + b"]}"  # pydantic: 1M errors
    assert f"at most {MAX_MESSAGES} messages" in refusal(many_ints).message
    parts = [user([TEXT] * (MAX_CONTENT_PARTS // 2)), user([TEXT] * (MAX_CONTENT_PARTS // 2 + 1))]
    err = refusal({"messages": parts})
    assert err.param == "messages[1].content" and f"at most {MAX_CONTENT_PARTS} content parts" in err.message
    err = refusal({"prompt": [7] * MAX_MODEL_LEN}, COMPLETION)
    assert err.param == "prompt" and f"{MAX_MODEL_LEN} token ids cannot fit" in err.message
    assert refusal({"prompt": [[7] * 5000]}, COMPLETION).param == "prompt[0]"
    assert "one prompt per request" in refusal({"prompt": ["a", "b"]}, COMPLETION).message


def test_unknown_keys_are_refused_wherever_they_are():
    for body, param in [
        ({"messages": [user("hi")], "foo": [1] * 100_000}, "foo"),
        ({"messages": [{**user("hi"), "extra": 1}]}, "messages[0].extra"),
        ({"messages": [user([{**TEXT, "x": 1}])]}, "messages[0].content[0].x"),
        (
            {"messages": [user([{**IMAGE, "image_url": {"url": "u", "uri": 1}}])]},
            "messages[0].content[0].image_url.uri",
        ),
        ({"prompt": "hi", "stream_options": {"include_usage": True, "zzz": 1}}, "stream_options.zzz"),
    ]:
        shape = COMPLETION if "prompt" in body else CHAT
        err = refusal(body, shape)
        assert err.message.endswith("unknown field")
        assert err.param == param, err.param


def test_large_json_where_no_container_belongs_is_refused_unparsed():
    for body in (
        {"messages": [user("hi")], "stop_token_ids": [1] * 100_000},
        {"messages": [user("hi")], "logit_bias": {str(i): 1 for i in range(20_000)}},
        {"messages": {"role": "user", "content": "x" * 100_000}},
        {"messages": [{"role": ["x"] * 50_000, "content": "hi"}]},
    ):
        assert "unexpected JSON" in refusal(body).message
    assert refusal([1] * 50_000).param is None


def test_malformed_json_is_a_400():
    bad_key = b'{"\xff": 1}'  # not UTF-8
    for raw in (b"{", b'{"messages": [' * 5000, b'{"messages": "hi"} trailing', b"[" * 100_000, bad_key):
        refusal(raw)


@pytest.fixture(scope="module")
def tokenizer_spec(checkpoints: dict[str, Path]) -> tuple[dict, tokenizers.Tokenizer]:
    path = checkpoints["qwen2_5_vl"] / "tokenizer.json"
    return json.loads(path.read_text()), tokenizers.Tokenizer.from_file(str(path))


def test_no_text_that_fits_is_refused(tokenizer_spec):
    spec, tok = tokenizer_spec
    per_token = max_chars_per_token(spec)
    assert per_token is not None  # byte-level BPE with NFC: Qwen's pipeline
    # Latin, runs, control, combining marks, Hangul jamo and Greek that NFC composes, CJK.
    alphabets = ["abc de", " ", "=", "\n\t", "e\u0301o\u0308", "\u1100\u1161\u11a8", "ω\u0313\u0300\u0345"]
    alphabets.append("日本語")
    rng = random.Random(0)
    for _ in range(300):
        alphabet = rng.choice(alphabets) + rng.choice(["", "<|im_end|>", "<|image_pad|>"])
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 2000)))
        assert len(tok.encode(text, add_special_tokens=False).ids) * per_token >= len(text), repr(text[:40])


def test_composition_leaves_a_byte_per_two_code_points():
    """The factor 2 of epd.server.text_bound: every character stands for at most twice as many
    code points (its canonical decomposition) as it has UTF-8 bytes."""
    worst = max(
        len(unicodedata.normalize("NFD", chr(c))) / len(chr(c).encode("utf-8", "surrogatepass"))
        for c in range(0x110000)
    )
    assert worst <= 2


def test_other_pipelines_get_no_bound(tokenizer_spec):
    spec, _ = tokenizer_spec
    assert max_chars_per_token({**spec, "normalizer": {"type": "Lowercase"}}) is None
    assert max_chars_per_token({**spec, "pre_tokenizer": {"type": "Whitespace"}}) is None
    assert max_chars_per_token({**spec, "model": {**spec["model"], "type": "WordPiece"}}) is None
    without = max_chars_per_token({**spec, "normalizer": None})
    assert without is not None and 2 * without == max_chars_per_token(spec)


def test_text_bound_counts_what_a_template_keeps(checkpoints):
    bound = TextBound.from_model_dir(checkpoints["qwen2_5_vl"], MAX_MODEL_LEN)
    assert bound.max_chars is not None
    bound.check(bound.max_chars, "messages")
    with pytest.raises(APIError, match="characters cannot fit"):
        bound.check(bound.max_chars + 1, "messages")
    req = ChatCompletionRequest.model_validate(
        {"messages": [user("  ab  "), user([TEXT, IMAGE, {"type": "text", "text": " " * 5000 + "c"}])]}
    )
    assert chat_text_chars(req.messages) == 2 + 2 + 1  # outer whitespace may be trimmed by templates


def test_default_pixel_limit_follows_the_model():
    assert default_max_image_pixels(28 * 28 * 256) == 4 << 20  # the demo model: the floor
    assert default_max_image_pixels(12_845_056) == 4 * 12_845_056  # Qwen2.5-VL's max_pixels

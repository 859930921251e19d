"""How the benchmark client times a stream: tokens count when their text or their ids arrive."""

from __future__ import annotations

import pytest

from epd.bench.serve.client import RequestResult, _Stream


def _chunk(content: str | None = None, token_ids: list[int] | None = None) -> dict:
    choice: dict = {"index": 0, "delta": {"content": content} if content else {}}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"choices": [choice]}


def test_tokens_without_text_still_time_ttft_and_itl() -> None:
    stream = _Stream(RequestResult(index=0, scheduled_s=0.0), start=10.0)
    stream.absorb(_chunk(token_ids=[151000]), now=10.5)  # a token that decodes to no text
    stream.absorb(_chunk(token_ids=[151001]), now=10.6)
    stream.absorb(_chunk("hi", [42]), now=10.8)
    stream.absorb({"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 5}}, now=10.9)
    stream.finish(now=11.0)
    r = stream.result
    assert r.ttft == pytest.approx(0.5)
    assert r.itl == pytest.approx([0.1, 0.2])
    assert r.text == "hi" and r.output_tokens == 3
    assert r.tpot == pytest.approx((1.0 - 0.5) / 2)


def test_a_stream_of_text_alone_is_timed_by_its_text() -> None:
    stream = _Stream(RequestResult(index=0, scheduled_s=0.0), start=0.0)
    stream.absorb(_chunk(token_ids=[]), now=0.1)  # an empty id list is no token
    stream.absorb(_chunk("a"), now=0.3)
    stream.absorb(_chunk("b"), now=0.4)
    stream.finish(now=0.5)
    assert stream.result.ttft == pytest.approx(0.3)
    assert stream.result.output_tokens == 2

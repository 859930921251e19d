"""Shared pieces of the OpenAI response shapes: deltas between cumulative outputs, usage, logprobs.

The engine yields cumulative `RequestOutput`s (all text and tokens so far); a stream sends
what is new since the last chunk. Text may lag tokens (held back while it could still be cut
by a stop string or end in half a UTF-8 character), so text and tokens advance separately.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from epd.inputs.tokenizer import Tokenizer
from epd.outputs import Logprob, PositionLogprobs, RequestOutput
from epd.server.metrics import RequestTiming

# JSON has no -inf; vLLM clamps to the same floor.
MIN_LOGPROB = -9999.0

TokenText = Callable[[int], str]  # token id -> its text (used when the engine sent none)


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None


class DeltaTracker:
    """Turns successive cumulative outputs of one request into deltas."""

    def __init__(self) -> None:
        self.text_len = 0
        self.num_tokens = 0

    def advance(self, out: RequestOutput) -> Delta:
        c = out.outputs[0]
        text = c.text[self.text_len :] if len(c.text) > self.text_len else ""
        tokens = list(c.token_ids[self.num_tokens :])
        logprobs = None if c.logprobs is None else list(c.logprobs[self.num_tokens :])
        self.text_len = max(self.text_len, len(c.text))
        self.num_tokens = len(c.token_ids)
        return Delta(text, tokens, logprobs, c.finish_reason, c.stop_reason)


def usage(out: RequestOutput) -> dict:
    """Token counts; prompt tokens include every image's placeholder tokens."""
    prompt, completion = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens},
    }


def clamp(logprob: float) -> float:
    return logprob if logprob > MIN_LOGPROB else MIN_LOGPROB  # also maps NaN to the floor


def ranked(position: PositionLogprobs, n: int) -> list[tuple[int, Logprob]]:
    """The n most likely tokens of a position, most likely first."""
    return sorted(position.items(), key=lambda item: -item[1].logprob)[:n]


def token_text_of(tokenizer: Tokenizer) -> TokenText:
    return lambda token_id: tokenizer.decode([token_id], False)


def text_of(token_id: int, lp: Logprob, token_text: TokenText) -> str:
    return lp.decoded_token if lp.decoded_token is not None else token_text(token_id)


class ResponseFormatter(ABC):
    """How one endpoint shapes a request's outputs: a whole response, or stream chunks.

    Streams go: `opening(first)` chunks, then `chunk(out, delta)` per engine output (None when
    there is nothing worth sending), then `usage_chunk(final)` if the client asked for usage.
    """

    chunk_object: str

    def __init__(self, request_id: str, model: str, token_text: TokenText) -> None:
        self.request_id, self.model, self.token_text = request_id, model, token_text
        self.created = int(time.time())

    def envelope(self, obj: str) -> dict:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model}

    @abstractmethod
    def response(self, out: RequestOutput, timing: RequestTiming) -> dict: ...

    def opening(self, first: RequestOutput) -> list[dict]:
        return []

    @abstractmethod
    def chunk(self, out: RequestOutput, delta: Delta, timing: RequestTiming) -> dict | None: ...

    def usage_chunk(self, out: RequestOutput) -> dict:
        return {**self.envelope(self.chunk_object), "choices": [], "usage": usage(out)}

"""One streamed chat request and what the client saw of it.

Client-side clock (time.perf_counter), from the moment the request is sent:
- TTFT: until the first chunk that carries text (the role-only opening chunk does not count);
- ITL: the gaps between successive text chunks (a chunk may hold several tokens);
- E2E: until the stream ends; TPOT = (E2E - TTFT) / (output tokens - 1), the first token excluded.
Output tokens come from the `usage` chunk (asked for with stream_options) when the server sends
one, else from the number of text chunks. Failures are results too (ok=False, with the error).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import httpx

from epd.bench.serve.workload import BenchRequest


@dataclass(frozen=True)
class PreparedRequest:
    """A request serialised before the run, so JSON encoding of big images is not timed."""

    index: int
    request: BenchRequest
    payload: bytes


def prepare(requests: list[BenchRequest], model: str, epd_timings: bool) -> list[PreparedRequest]:
    prepared = []
    for i, req in enumerate(requests):
        body = {"model": model, "messages": req.messages, **req.extra, "stream": True}
        body["stream_options"] = {"include_usage": True}
        if req.max_tokens is not None:
            body["max_tokens"] = req.max_tokens
        if epd_timings:  # an epd server: also ask for token ids, so tokens without text still time TTFT
            body["epd_timings"] = True
            body["return_token_ids"] = True
        prepared.append(PreparedRequest(i, req, json.dumps(body).encode()))
    return prepared


@dataclass
class RequestResult:
    index: int
    scheduled_s: float  # when the arrival process said to send it, from the start of the run
    sent_s: float | None = None  # when it was sent (later than scheduled when --max-concurrency held it)
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None  # the server's count (images' tokens included)
    prompt_text_tokens: int | None = None  # the workload's count of its text
    num_images: int = 0
    text: str = ""
    expected: str | None = None
    correct: bool | None = None
    epd_timings: dict | None = None
    request_class: str | None = None  # a mixed workload's class (--classes)
    slo_ttft: float | None = None  # its class's SLO, judged instead of the run's
    slo_tpot: float | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "tpot": self.tpot}

    @classmethod
    def from_dict(cls, data: dict) -> RequestResult:
        return cls(**{k: v for k, v in data.items() if k != "tpot"})


class _Stream:
    """Accumulates the chunks of one SSE stream into a RequestResult."""

    def __init__(self, result: RequestResult, start: float) -> None:
        self.result, self.start, self.last = result, start, start
        self.text_chunks: list[str] = []

    def absorb(self, chunk: dict, now: float) -> None:
        r = self.result
        if "error" in chunk:
            raise _StreamError(json.dumps(chunk["error"])[:500])
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            # A token arrived if text did, or (servers that return them) its id did: a model whose
            # tokens decode to no text (random weights, a small test tokenizer) still times right.
            if content or choice.get("token_ids"):
                if r.ttft is None:
                    r.ttft = now - self.start
                else:
                    r.itl.append(now - self.last)
                self.last = now
            if content:
                self.text_chunks.append(content)
        if chunk.get("usage"):
            r.output_tokens = chunk["usage"].get("completion_tokens", 0)
            r.prompt_tokens = chunk["usage"].get("prompt_tokens")
        if chunk.get("epd_timings") is not None:
            r.epd_timings = chunk["epd_timings"]

    def finish(self, now: float) -> None:
        r = self.result
        r.ok, r.e2e, r.text = True, now - self.start, "".join(self.text_chunks)
        if not r.output_tokens:
            r.output_tokens = len(self.text_chunks)
        if r.ttft is None:  # tokens that decode to no text: the answer was whole at the end
            r.ttft = r.e2e


class _StreamError(Exception):
    pass


async def send(
    client: httpx.AsyncClient, url: str, prepared: PreparedRequest, result: RequestResult, t0: float
) -> RequestResult:
    """Send one request, stream the answer, fill `result` (times relative to `t0`, the run's start)."""
    start = time.perf_counter()
    result.sent_s = start - t0
    result.num_images = prepared.request.num_images
    result.prompt_text_tokens = prepared.request.prompt_text_tokens
    result.expected = prepared.request.expected
    own_slo(result, prepared.request)
    stream = _Stream(result, start)
    try:
        async with client.stream("POST", url, content=prepared.payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {body[:500]}"
                return result
            await _read_events(resp, stream)
        stream.finish(time.perf_counter())
    except (_StreamError, httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"[:500]
    if result.ok and result.expected is not None:
        from epd.demo.shapes import is_correct

        result.correct = is_correct(result.text, result.expected)
    return result


async def _read_events(resp: httpx.Response, stream: _Stream) -> None:
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        stream.absorb(json.loads(data), time.perf_counter())
    raise _StreamError("the stream ended without [DONE]")


def own_slo(result: RequestResult, request: BenchRequest) -> None:
    """A mixed workload's request: its class and the SLO that judges it."""
    if request.request_class is not None:
        result.request_class = request.request_class
        slo = request.slo
        result.slo_ttft, result.slo_tpot = (slo.ttft, slo.tpot) if slo is not None else (None, None)

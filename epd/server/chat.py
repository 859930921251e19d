"""POST /v1/chat/completions: messages with text and images -> an assistant message.

Response extensions, present only when asked for:
- `return_token_ids`: `prompt_token_ids` on the response (streaming: on the first chunk)
  and `token_ids` on the choice (streaming: the new ids of each chunk), as vLLM returns them;
- `epd_timings`: `{"ttft", "e2e", "preprocess", "stages": {stage: seconds}}` on the response
  (streaming: on the chunk that carries the finish_reason).
Choices also carry vLLM's `stop_reason` (the stop string or token id that ended them).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from epd.entrypoints.async_engine import AsyncEngine
from epd.inputs.types import ProcessedPrompt
from epd.outputs import Logprob, PositionLogprobs, RequestOutput
from epd.server.body import read_json_with_images
from epd.server.formatting import (
    Delta,
    ResponseFormatter,
    TokenText,
    clamp,
    ranked,
    text_of,
    token_text_of,
    usage,
)
from epd.server.media import engine_messages
from epd.server.metrics import RequestTiming
from epd.server.protocol import ChatCompletionRequest
from epd.server.sampling import build_sampling_params
from epd.server.serving import Generation, run_generation
from epd.server.shape import CHAT
from epd.server.state import get_state, require_api_key
from epd.server.text_bound import chat_text_chars

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    timing = RequestTiming(time.time())
    state = get_state(request)
    req, images = await read_json_with_images(request, ChatCompletionRequest, CHAT, state)
    state.check_model(req.model)
    state.text_bound.check(chat_text_chars(req.messages), "messages")  # before any tokenizing
    messages = engine_messages(req.messages, state.media, images)
    has_images = _has_images(messages)
    engine = state.engine
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    token_text = token_text_of(engine.processor.tokenizer)
    gen = Generation(
        request_id=request_id,
        timing=timing,
        process=_processed_once(engine, messages),
        has_images=has_images,
        params=lambda prompt_len: build_sampling_params(
            req,
            max_tokens=req.requested_max_tokens,
            num_logprobs=req.num_logprobs,
            prompt_len=prompt_len,
            max_model_len=engine.max_model_len,
        ),
        formatter=ChatFormatter(req, request_id, state.config.served_model_name, token_text),
        stream=req.stream,
        include_usage=req.include_usage,
    )
    del images, messages  # `process` holds them until it runs, and no longer (_processed_once)
    return await run_generation(request, state, gen)


def _processed_once(engine: AsyncEngine, messages: list[dict]) -> Callable[[], ProcessedPrompt]:
    """The messages processed, by a call that lets go of them as it starts: their images are
    slices of the request's body (megabytes of base64), which can then be freed once they are
    decoded instead of when the response is sent, so fewer bodies' memory is in use at once and
    the next bodies reuse it (memory used for the first time costs a page fault per 4 KiB)."""
    held = [messages]

    def process() -> ProcessedPrompt:
        return engine.prepare_images(engine.processor.process_chat(held.pop()))

    return process


def _has_images(messages: list[dict]) -> bool:
    return any(
        part["type"] in ("image_url", "video_url")
        for message in messages
        if not isinstance(message["content"], str)
        for part in message["content"]
    )


class ChatFormatter(ResponseFormatter):
    chunk_object = "chat.completion.chunk"

    def __init__(
        self, req: ChatCompletionRequest, request_id: str, model: str, token_text: TokenText
    ) -> None:
        super().__init__(request_id, model, token_text)
        self.req = req

    def response(self, out: RequestOutput, timing: RequestTiming) -> dict:
        c = out.outputs[0]
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": self._logprobs(c.token_ids, c.logprobs),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        body = {**self.envelope("chat.completion"), "choices": [choice], "usage": usage(out)}
        if self.req.return_token_ids:
            choice["token_ids"] = list(c.token_ids)
            body["prompt_token_ids"] = list(out.prompt_token_ids)
        if self.req.epd_timings:
            body["epd_timings"] = timing.report(out)
        return body

    def opening(self, first: RequestOutput) -> list[dict]:
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        chunk = {**self.envelope(self.chunk_object), "choices": [choice]}
        if self.req.return_token_ids:
            choice["token_ids"] = []
            chunk["prompt_token_ids"] = list(first.prompt_token_ids)
        return [chunk]

    def chunk(self, out: RequestOutput, delta: Delta, timing: RequestTiming) -> dict | None:
        tokens_wanted = self.req.logprobs or self.req.return_token_ids
        if not delta.text and delta.finish_reason is None and not (delta.token_ids and tokens_wanted):
            return None
        choice: dict = {
            "index": 0,
            "delta": {"content": delta.text} if delta.text else {},
            "logprobs": self._logprobs(delta.token_ids, delta.logprobs),
            "finish_reason": delta.finish_reason,
        }
        if delta.finish_reason is not None:
            choice["stop_reason"] = delta.stop_reason
        if self.req.return_token_ids:
            choice["token_ids"] = delta.token_ids
        chunk = {**self.envelope(self.chunk_object), "choices": [choice]}
        if delta.finish_reason is not None and self.req.epd_timings:
            chunk["epd_timings"] = timing.report(out)
        return chunk

    def _logprobs(self, token_ids: list[int], positions: list[PositionLogprobs] | None) -> dict | None:
        if not self.req.logprobs or positions is None:
            return None
        top_n = self.req.top_logprobs or 0
        return {"content": [self._entry(t, pos, top_n) for t, pos in zip(token_ids, positions)]}

    def _entry(self, token_id: int, position: PositionLogprobs, top_n: int) -> dict:
        entry = self._token(token_id, position[token_id])
        entry["top_logprobs"] = [self._token(t, lp) for t, lp in ranked(position, top_n)]
        return entry

    def _token(self, token_id: int, lp: Logprob) -> dict:
        text = text_of(token_id, lp, self.token_text)
        return {"token": text, "logprob": clamp(lp.logprob), "bytes": list(text.encode("utf-8"))}

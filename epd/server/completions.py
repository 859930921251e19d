"""POST /v1/completions: a plain text prompt (or token ids) -> its continuation.

One prompt per request (a list holding one prompt is accepted). No images here: use chat.
`echo`, `suffix` and `best_of` > 1 are refused. `logprobs: k` returns OpenAI's legacy shape
(tokens, token_logprobs, top_logprobs, text_offset). With `return_token_ids`, each choice
carries `prompt_token_ids` and `token_ids`, as vLLM's completions do.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from epd.outputs import PositionLogprobs, RequestOutput
from epd.server.body import read_json
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
from epd.server.metrics import RequestTiming
from epd.server.protocol import CompletionRequest
from epd.server.sampling import build_sampling_params
from epd.server.serving import Generation, run_generation
from epd.server.shape import COMPLETION
from epd.server.state import get_state, require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    timing = RequestTiming(time.time())
    state = get_state(request)
    req = await read_json(request, CompletionRequest, COMPLETION, state)
    state.check_model(req.model)
    engine = state.engine
    prompt = req.single_prompt()
    if isinstance(prompt, str):
        state.text_bound.check(len(prompt), "prompt")  # before any tokenizing
    request_id = f"cmpl-{uuid.uuid4().hex}"
    gen = Generation(
        request_id=request_id,
        timing=timing,
        process=lambda: engine.prepare_images(engine.processor.process_prompt(prompt)),
        has_images=False,
        params=lambda prompt_len: build_sampling_params(
            req,
            max_tokens=req.requested_max_tokens,
            num_logprobs=req.num_logprobs,
            prompt_len=prompt_len,
            max_model_len=engine.max_model_len,
        ),
        formatter=CompletionFormatter(
            req, request_id, state.config.served_model_name, token_text_of(engine.processor.tokenizer)
        ),
        stream=req.stream,
        include_usage=req.include_usage,
    )
    return await run_generation(request, state, gen)


class CompletionFormatter(ResponseFormatter):
    chunk_object = "text_completion"

    def __init__(self, req: CompletionRequest, request_id: str, model: str, token_text: TokenText) -> None:
        super().__init__(request_id, model, token_text)
        self.req = req
        self._text_offset = 0  # where the next streamed token's text starts
        self._sent_prompt_ids = False

    def response(self, out: RequestOutput, timing: RequestTiming) -> dict:
        c = out.outputs[0]
        choice = {
            "index": 0,
            "text": c.text,
            "logprobs": self._logprobs(c.token_ids, c.logprobs, 0),
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        if self.req.return_token_ids:
            choice["prompt_token_ids"] = list(out.prompt_token_ids)
            choice["token_ids"] = list(c.token_ids)
        body = {**self.envelope("text_completion"), "choices": [choice], "usage": usage(out)}
        if self.req.epd_timings:
            body["epd_timings"] = timing.report(out)
        return body

    def chunk(self, out: RequestOutput, delta: Delta, timing: RequestTiming) -> dict | None:
        tokens_wanted = self.req.logprobs is not None or self.req.return_token_ids
        if not delta.text and delta.finish_reason is None and not (delta.token_ids and tokens_wanted):
            return None
        logprobs = self._logprobs(delta.token_ids, delta.logprobs, self._text_offset)
        if logprobs is not None:
            self._text_offset += sum(len(token) for token in logprobs["tokens"])
        choice: dict = {
            "index": 0,
            "text": delta.text,
            "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
        }
        if delta.finish_reason is not None:
            choice["stop_reason"] = delta.stop_reason
        if self.req.return_token_ids:
            if not self._sent_prompt_ids:
                choice["prompt_token_ids"] = list(out.prompt_token_ids)
                self._sent_prompt_ids = True
            choice["token_ids"] = delta.token_ids
        chunk = {**self.envelope(self.chunk_object), "choices": [choice]}
        if delta.finish_reason is not None and self.req.epd_timings:
            chunk["epd_timings"] = timing.report(out)
        return chunk

    def _logprobs(
        self, token_ids: list[int], positions: list[PositionLogprobs] | None, offset: int
    ) -> dict | None:
        if self.req.logprobs is None or positions is None:
            return None
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for token_id, position in zip(token_ids, positions):
            text = text_of(token_id, position[token_id], self.token_text)
            tokens.append(text)
            token_logprobs.append(clamp(position[token_id].logprob))
            tops.append(
                {
                    text_of(t, lp, self.token_text): clamp(lp.logprob)
                    for t, lp in ranked(position, self.req.logprobs)
                }
            )
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

"""Request fields + prompt length -> `SamplingParams`, refusing what could never fit the context."""

from __future__ import annotations

from epd.sampling_params import SamplingParams
from epd.server.errors import bad_request
from epd.server.protocol import SamplingRequest


def build_sampling_params(
    req: SamplingRequest,
    *,
    max_tokens: int | None,
    num_logprobs: int | None,
    prompt_len: int,
    max_model_len: int,
) -> SamplingParams:
    """The engine's params for `req`.

    `max_tokens=None` means "until the context is full" (vLLM's default for chat). A prompt
    that leaves no room, or a `max_tokens` beyond the room left, is a 400 that says by how
    much, rather than a silently shortened answer. Invalid values (SamplingParams raises
    ValueError) are a 400 too.
    """
    room = max_model_len - prompt_len
    if room < 1:
        raise bad_request(
            f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{prompt_len} tokens (images included); shorten the messages or send fewer images",
            "messages",
        )
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise bad_request(
            f"this model's maximum context length is {max_model_len} tokens; you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
            "completion); lower max_tokens or shorten the prompt",
            "max_tokens",
        )
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            seed=req.seed,
            max_tokens=max_tokens,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            logprobs=num_logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            slo_ttft=req.slo_ttft,
            slo_tpot=req.slo_tpot,
            priority=req.priority,
        )
    except ValueError as e:
        raise bad_request(str(e)) from None

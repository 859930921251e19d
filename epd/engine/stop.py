"""When a request stops, and the text it shows: EOS, stop tokens, stop strings, lengths."""

from __future__ import annotations

from collections.abc import Callable

from epd.engine.request import Request

Decode = Callable[[list[int], bool], str]


def update_text_and_check_stop(
    request: Request, decode: Decode, eos_token_ids: frozenset[int], max_model_len: int
) -> None:
    """After a token was appended: set finish/stop reason if it ends here, and the final text.

    Order as in vLLM: EOS and stop tokens, then stop strings, then the length limits.
    The text so far is refreshed here only when stop strings must search it; otherwise whoever
    reads it mid-generation calls `refresh_text` (two tokenizer calls per request per step
    were the largest host cost of a decode step at batch 64, for text nobody read).
    """
    params = request.params
    token = request.output_token_ids[-1]
    previous_len = len(request.output_text)
    if params.stop:
        refresh_text(request, decode)
    if (token in eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
        request.finish_reason = "stop"
        request.stop_reason = None if token in eos_token_ids else token
    elif params.stop and _truncate_at_stop_string(request, previous_len):
        pass
    elif params.max_tokens is not None and len(request.output_token_ids) >= params.max_tokens:
        request.finish_reason = "length"
    elif request.num_tokens >= max_model_len:
        request.finish_reason = "length"
    if request.finish_reason is not None:
        _final_text(request, decode)


def refresh_text(request: Request, decode: Decode) -> None:
    """Bring `output_text` up to the last token; a no-op once finished (the final text is set)."""
    if request.finish_reason is None:
        request.output_text += request.detokenizer.step(
            decode, request.output_token_ids, request.params.skip_special_tokens
        )


def _final_text(request: Request, decode: Decode) -> None:
    """The finished text from one full decode, cut at the stop string as during generation."""
    params = request.params
    request.output_text = decode(request.output_token_ids, params.skip_special_tokens)
    if isinstance(request.stop_reason, str):
        _truncate_at_stop_string(request, 0)


def _truncate_at_stop_string(request: Request, previous_len: int) -> bool:
    """Find the earliest stop string that ends in the newly decoded text; cut the text there."""
    params, text = request.params, request.output_text
    longest = max(len(s) for s in params.stop)
    # A match must end in the new text, so it starts at most `longest` chars before it.
    window_start = max(0, previous_len - longest + 1)
    best: tuple[int, str] | None = None
    for stop in params.stop:
        at = text.find(stop, window_start)
        if at != -1 and (best is None or at < best[0]):
            best = (at, stop)
    if best is None:
        return False
    at, stop = best
    request.output_text = text[: at + len(stop)] if params.include_stop_str_in_output else text[:at]
    request.finish_reason, request.stop_reason = "stop", stop
    return True

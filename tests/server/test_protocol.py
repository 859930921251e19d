"""Server pieces without a server: request validation, error bodies, media policy, params, deltas."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from epd.outputs import CompletionOutput, RequestMetrics, RequestOutput
from epd.server.errors import APIError, format_loc, from_validation_error
from epd.server.formatting import DeltaTracker
from epd.server.media import MediaPolicy
from epd.server.protocol import ChatCompletionRequest, CompletionRequest
from epd.server.sampling import build_sampling_params


def chat_request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def error_of(body: str, model=ChatCompletionRequest) -> APIError:
    with pytest.raises(ValidationError) as info:
        model.model_validate_json(body)
    return from_validation_error(info.value)


def test_error_names_the_field_and_the_problem():
    err = error_of('{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}')
    assert err.status == 400 and err.param == "messages[0].content[0].text"
    assert err.body()["error"] == {
        "message": "messages[0].content[0].text: Input should be a valid string",
        "type": "invalid_request_error",
        "param": "messages[0].content[0].text",
        "code": None,
    }
    assert error_of('{"messages": [], "foo": 1}').message.startswith("messages:")  # 2 problems: one shown
    assert "unknown field" in error_of('{"messages": [{"role": "user", "content": "x"}], "foo": 1}').message
    assert "not valid JSON" in error_of("{").message


def test_format_loc_drops_union_branches_and_part_tags():
    assert format_loc(("messages", 0, "content", "list[tagged-union[TextPart,ImagePart]]", 1, "image_url",
                       "image_url", "url")) == "messages[0].content[1].image_url.url"  # fmt: skip
    assert format_loc(("body", "stop", "str")) == "stop"


def test_neutral_openai_fields_are_accepted_others_refused():
    chat_request(n=1, frequency_penalty=0, presence_penalty=0.0, logit_bias={}, user="u", tools=[])
    for field, value in (("n", 2), ("frequency_penalty", 0.1), ("logit_bias", {"5": 1.0})):
        with pytest.raises(ValidationError, match="not supported"):
            chat_request(**{field: value})


def test_strict_types():
    for field, value in (("temperature", "0.5"), ("stream", 1), ("max_tokens", 2.0), ("seed", True)):
        with pytest.raises(ValidationError):
            chat_request(**{field: value})


def test_max_completion_tokens_wins_and_logprobs_map():
    req = chat_request(max_tokens=5, max_completion_tokens=7, logprobs=True, top_logprobs=3)
    assert req.requested_max_tokens == 7 and req.num_logprobs == 3
    assert chat_request().num_logprobs is None and chat_request(logprobs=True).num_logprobs == 0


def test_completion_prompt_shapes():
    assert CompletionRequest.model_validate({"prompt": ["hi"]}).single_prompt() == "hi"
    assert CompletionRequest.model_validate({"prompt": [[1, 2]]}).single_prompt() == [1, 2]
    assert CompletionRequest.model_validate({"prompt": [1, 2]}).single_prompt() == [1, 2]
    assert CompletionRequest.model_validate({"prompt": "x"}).requested_max_tokens == 16


@pytest.mark.parametrize(
    "url, local, remote, ok",
    [("data:image/png;base64,AAAA", False, False, True), ("DATA:,x", False, False, True),
     ("https://example.com/a.png", False, False, False), ("https://example.com/a.png", False, True, True),
     ("http:/etc/passwd", True, True, False), ("file:///tmp/a.png", False, True, False),
     ("file:///tmp/a.png", True, False, True), ("/tmp/a.png", False, False, False),
     ("a.png", True, False, True), ("C:\\\\a.png", True, False, True), ("ftp://x/a.png", True, True, False),
     ("javascript:x", True, True, False)],
)  # fmt: skip
def test_media_policy(url, local, remote, ok):
    policy = MediaPolicy(allow_local=local, allow_remote=remote)
    if ok:
        policy.check(url, "p")
    else:
        with pytest.raises(APIError) as err:
            policy.check(url, "p")
        assert err.value.status == 400 and err.value.param == "p"


def test_sampling_params_respect_the_context():
    req = chat_request(temperature=0.5, stop="x", seed=3)
    params = build_sampling_params(req, max_tokens=None, num_logprobs=None, prompt_len=100, max_model_len=128)
    assert params.max_tokens == 28 and params.stop == ["x"] and params.seed == 3 and params.temperature == 0.5
    with pytest.raises(APIError, match="you requested 129 tokens"):
        build_sampling_params(req, max_tokens=29, num_logprobs=None, prompt_len=100, max_model_len=128)
    with pytest.raises(APIError, match="the prompt has 128 tokens"):
        build_sampling_params(req, max_tokens=None, num_logprobs=None, prompt_len=128, max_model_len=128)
    with pytest.raises(APIError, match="top_p"):
        build_sampling_params(
            chat_request(top_p=0), max_tokens=1, num_logprobs=None, prompt_len=1, max_model_len=8
        )


def output(text: str, token_ids: list[int], finish: str | None = None) -> RequestOutput:
    completion = CompletionOutput(0, text, token_ids, None, finish)
    return RequestOutput("r", None, [1, 2], [completion], finish is not None, RequestMetrics(0.0))


def test_delta_tracker_lets_text_lag_tokens():
    tracker = DeltaTracker()
    first = tracker.advance(output("He", [1, 2]))
    held = tracker.advance(output("He", [1, 2, 3]))  # the text of token 3 is held back
    last = tracker.advance(output("Hello!", [1, 2, 3, 4], "stop"))
    assert (first.text, first.token_ids) == ("He", [1, 2])
    assert (held.text, held.token_ids) == ("", [3])
    assert (last.text, last.token_ids, last.finish_reason) == ("llo!", [4], "stop")

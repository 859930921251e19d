"""The scheduling extension fields: `slo_ttft` (seconds) and `priority` (lower: sooner)."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from epd.sampling_params import SamplingParams
from epd.server.protocol import ChatCompletionRequest, CompletionRequest
from epd.server.sampling import build_sampling_params

from .conftest import MODEL_NAME


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_the_fields_reach_the_sampling_params():
    for req in (chat(slo_ttft=0.5, priority=-3), CompletionRequest(prompt="hi", slo_ttft=2, priority=7)):
        params = build_sampling_params(req, max_tokens=4, num_logprobs=None, prompt_len=10, max_model_len=64)
        assert (params.slo_ttft, params.priority) == (req.slo_ttft, req.priority)
    params = build_sampling_params(chat(), max_tokens=4, num_logprobs=None, prompt_len=10, max_model_len=64)
    assert (params.slo_ttft, params.priority) == (None, 0), "unset: the server's defaults"


INVALID = [{"slo_ttft": -1.0}, {"slo_ttft": 0}, {"slo_ttft": "1"}, {"priority": 1.5}]


@pytest.mark.parametrize("fields", INVALID)
def test_invalid_values_are_refused(fields):
    with pytest.raises(ValidationError):
        chat(**fields)


def test_sampling_params_check_slo_ttft():
    with pytest.raises(ValueError, match="slo_ttft"):
        SamplingParams(slo_ttft=-0.1)
    assert SamplingParams(slo_ttft=0.1, priority=-2).priority == -2


def test_the_server_accepts_the_fields_and_answers_400_for_a_negative_slo_ttft(server):
    url, headers = server.url + "/v1/chat/completions", server.headers()
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ok = httpx.post(url, headers=headers, json={**body, "slo_ttft": 30.0, "priority": -1}, timeout=120)
    assert ok.status_code == 200, ok.text
    bad = httpx.post(url, headers=headers, json={**body, "slo_ttft": -1}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "slo_ttft"
    done = httpx.post(
        server.url + "/v1/completions", headers=headers, timeout=120,
        json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2, "priority": 3},
    )  # fmt: skip
    assert done.status_code == 200, done.text

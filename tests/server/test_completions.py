"""/v1/completions, /v1/models and the API key, through the openai client and plain HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest

from epd import LLM, SamplingParams

from .conftest import MODEL_NAME

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def reference(model: str):
    with LLM(model) as llm:
        [out] = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, logprobs=2), use_tqdm=False)
    return out


def test_completion_matches_offline(client, reference):
    resp = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        logprobs=2,
        extra_body={"return_token_ids": True},
    )
    choice = resp.choices[0]
    assert choice.text == reference.outputs[0].text
    assert choice.token_ids == reference.outputs[0].token_ids
    assert choice.prompt_token_ids == reference.prompt_token_ids
    assert resp.usage.prompt_tokens == len(reference.prompt_token_ids)
    assert resp.usage.completion_tokens == len(reference.outputs[0].token_ids)
    want = [p[t].logprob for t, p in zip(reference.outputs[0].token_ids, reference.outputs[0].logprobs)]
    assert choice.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert choice.logprobs.text_offset == sorted(choice.logprobs.text_offset)


def test_streamed_completion_matches(client, reference):
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"return_token_ids": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference.outputs[0].text
    ids = [t for c in chunks if c.choices for t in c.choices[0].token_ids]
    assert ids == reference.outputs[0].token_ids
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_token_id_prompt_and_batch_of_one(client, reference):
    for prompt in (reference.prompt_token_ids, [PROMPT]):
        resp = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10, temperature=0)
        assert resp.choices[0].text == reference.outputs[0].text
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model=MODEL_NAME, prompt=[PROMPT, PROMPT], max_tokens=2)


def test_models_lists_the_served_name(client, model):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].root == model


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-7", prompt="hi", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test-epd"}])
def test_api_key_required_on_v1(server, headers):
    for method, path in (
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
    ):
        resp = httpx.request(method, server.url + path, headers=headers, json={"prompt": "hi"}, timeout=10)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # open, for orchestrators


def test_openai_client_with_wrong_key(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()

"""Schema fuzz: hypothesis generates >= 2,000 bodies for /v1/chat/completions and /v1/completions
from the JSON schema of their request models (epd/server/protocol.py: the server exposes no
/openapi.json), valid ones and broken ones, and sends them to the real server. None may get a 5xx;
afterwards the server is healthy and idle (nothing admitted, KV and MM caches unpinned).

| body                | how                                                              | share |
|---------------------|------------------------------------------------------------------|-------|
| from the schema     | every property the schema allows, optional ones at random;       | 1/2   |
|                     | unsupported OpenAI fields mostly at their neutral value          |       |
| mutated             | a schema body with one field deleted, replaced by any JSON value,| 1/3   |
|                     | or an unknown field added                                        |       |
| not a request       | any JSON value, or bytes                                         | 1/6   |

Cheap on purpose: at most a few tokens per request (a body that names no limit gets one), tiny
images, examples fixed by `derandomize` so CI runs the same cases every time.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from epd.server import protocol
from epd.server.protocol import ChatCompletionRequest, CompletionRequest
from epd.testing.images import noise_image

from .conftest import API_KEY, MODEL_NAME
from .helpers import ServerProcess, data_url, encode_image, metrics, wait_until_idle
from .hostile import json_paths, resolve_path

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BATCH, BATCHES = 50, 42  # bodies per hypothesis example, examples: 2,100 requests
CONCURRENCY = 8
TINY_PNG = data_url(encode_image(noise_image(28, 28, seed=3), "PNG"))
# Text with the model's special tokens among plain words: typed, they must stay plain text.
FRAGMENTS = ["hi", " ", "é", "🙂", "\x00", "\n", "<|image_pad|>", "<|vision_start|>", "<|im_end|>", "{{"]
TEXT = st.one_of(st.text(max_size=12), st.lists(st.sampled_from(FRAGMENTS), max_size=4).map("".join))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
URLS = [TINY_PNG, "data:,", "data:image/png;base64,AAAA", "x", "http://127.0.0.1:1/a.png", "/dev/zero"]
# Fields whose schema allows what would be costly or dull, by property name.
OVERRIDES: dict[str, st.SearchStrategy] = {
    # A few tokens, or far past the context (a 400): never a long generation.
    "max_tokens": st.none() | st.integers(1, 3) | st.integers(1025, 2**64),
    "max_completion_tokens": st.none() | st.integers(1, 3) | st.integers(1025, 2**64),
    "url": st.sampled_from(URLS) | TEXT,
    "model": st.sampled_from([None, MODEL_NAME]) | TEXT,
    # Token ids: mostly in the vocabulary, some far past it.
    "prompt": st.one_of(
        TEXT,
        st.lists(st.integers(0, 300) | st.integers(0, protocol.INT32_MAX), min_size=1, max_size=6),
        st.lists(TEXT, min_size=1, max_size=1),
        st.lists(st.lists(st.integers(0, 300), max_size=6), min_size=1, max_size=1),
    ),
}


def from_schema(node: dict, defs: dict, name: str | None = None) -> st.SearchStrategy:
    """A strategy of JSON values that `node` (a JSON schema, `$ref`s into `defs`) accepts."""
    if name in OVERRIDES:
        return OVERRIDES[name]
    if name in protocol._NEUTRAL:  # mostly "feature off", else anything the schema allows
        neutral = st.sampled_from(protocol._NEUTRAL[name])
        return st.one_of(neutral, neutral, _typed(node, defs, name))
    return _typed(node, defs, name)


def _typed(node: dict, defs: dict, name: str | None) -> st.SearchStrategy:
    if "$ref" in node:
        return from_schema(defs[node["$ref"].rsplit("/", 1)[1]], defs, name)
    if "anyOf" in node or "oneOf" in node:
        return st.one_of([from_schema(n, defs, name) for n in node.get("anyOf", node.get("oneOf"))])
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kind = node.get("type")
    if kind == "object":
        return _object(node, defs)
    if kind == "array":
        items = from_schema(node.get("items", {}), defs)
        return st.lists(items, min_size=node.get("minItems", 0), max_size=min(node.get("maxItems", 3), 3))
    if kind == "integer":
        return st.integers(node.get("minimum"), node.get("maximum"))
    if kind == "number":
        return st.floats(node.get("minimum"), allow_nan=False, allow_infinity=False)
    if kind == "string":
        return TEXT.filter(lambda s: len(s) >= node.get("minLength", 0))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JSON  # {}: anything


def _object(node: dict, defs: dict) -> st.SearchStrategy:
    properties, required = node.get("properties", {}), set(node.get("required", ()))
    fields = {k: from_schema(v, defs, k) for k, v in properties.items()}
    if not properties and isinstance(node.get("additionalProperties"), dict):  # logit_bias
        return st.dictionaries(TEXT, from_schema(node["additionalProperties"], defs), max_size=2)
    return st.fixed_dictionaries(
        {k: s for k, s in fields.items() if k in required},
        optional={k: s for k, s in fields.items() if k not in required},
    )


def request_bodies(model: type) -> st.SearchStrategy:
    schema = model.model_json_schema()
    return from_schema(schema, schema.get("$defs", {}))


@st.composite
def mutated(draw: st.DrawFn, bodies: st.SearchStrategy) -> dict:
    """A schema body with one thing wrong (or, by chance, still right)."""
    body = draw(bodies)
    paths = list(json_paths(body))
    op = draw(st.sampled_from(["delete", "replace", "add"]))
    if not paths:
        op = "add"
    if op == "add":
        body[draw(st.sampled_from(["zzz", "max_token", "messages", "prompt", "stream"]))] = draw(JSON)
        return body
    parent, key = resolve_path(body, draw(st.sampled_from(paths)))
    if op == "delete":
        del parent[key]
    else:
        parent[key] = draw(JSON)
    return body


def cheap(body: Any) -> Any:
    """A dict that names no token limit gets one (chat's default fills the context)."""
    limits = ("max_tokens", "max_completion_tokens")
    if isinstance(body, dict) and all(body.get(name) is None for name in limits):
        body["max_tokens"] = 2
    return body


def cases(path: str, model: type) -> st.SearchStrategy:
    bodies = request_bodies(model)
    as_json = st.one_of(bodies, bodies, bodies, mutated(bodies), mutated(bodies), JSON)
    content = st.one_of(as_json.map(cheap).map(lambda b: json.dumps(b).encode()), st.binary(max_size=40))
    return st.tuples(st.just(path), content)


CASES = st.one_of(cases(CHAT, ChatCompletionRequest), cases(COMPLETIONS, CompletionRequest))


async def send_all(url: str, batch: list[tuple[str, bytes]]) -> list[tuple[int, bytes]]:
    limit = asyncio.Semaphore(CONCURRENCY)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:

        async def send(path: str, content: bytes) -> tuple[int, bytes]:
            async with limit:
                try:
                    resp = await http.post(path, content=content, headers=headers)
                except httpx.TransportError as err:  # the server dropped the connection
                    return 599, repr(err).encode()
                return resp.status_code, resp.content

        return await asyncio.gather(*(send(path, content) for path, content in batch))


def failed(status: int, answer: bytes) -> bool:
    """A 5xx, or a stream that started (200) and then carried an error event."""
    return status >= 500 or (status == 200 and b'data: {"error"' in answer)


def test_schema_fuzz_never_answers_5xx_and_leaves_the_server_idle(server: ServerProcess):
    statuses: list[int] = []

    @settings(
        max_examples=BATCHES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],  # a failing batch is reported whole; shrinking would resend it
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(CASES, min_size=BATCH, max_size=BATCH))
    def batch(cases: list[tuple[str, bytes]]) -> None:
        answers = asyncio.run(send_all(server.url, cases))
        statuses.extend(status for status, _ in answers)
        errors = [(p, c[:2000], s, a[:300]) for (p, c), (s, a) in zip(cases, answers) if failed(s, a)]
        assert not errors, f"{len(errors)} server errors, e.g.:\n" + "\n".join(map(str, errors[:5]))

    batch()
    assert len(statuses) >= 2000
    assert statuses.count(200) >= 100, f"too few valid bodies: {sorted(set(statuses))}"
    m = wait_until_idle(server.url)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert all(v == 1 for v in m["epd_instance_up"].values())
    assert metrics(server.url)["epd_requests_admitted"] == {(): 0.0}

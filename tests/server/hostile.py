"""Malformed and hostile requests for the fuzz test: a hand-written list plus seeded mutations.

Every hand-written case names the status it must get. Mutations of a valid request may
stay valid (200), so for them only "never 5xx; a 4xx carries an error body" holds.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field
from typing import Any

from epd.testing.images import noise_image

from .helpers import data_url, encode_image, png_header_only

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@dataclass
class Case:
    name: str
    body: Any  # dict/list (sent as JSON) or bytes (sent as is)
    expect: int = 400
    path: str = CHAT
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    auth: bool = True

    def content(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()


def base_chat(model: str, image_url: str) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "hi"}]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 2,
        "temperature": 0,
    }


def base_completion(model: str) -> dict:
    return {"model": model, "prompt": "hello there", "max_tokens": 2, "temperature": 0}


def with_(base: dict, **changes: Any) -> dict:
    out = copy.deepcopy(base)
    out.update(changes)
    return out


def with_content(base: dict, *parts: Any) -> dict:
    return with_(base, messages=[{"role": "user", "content": list(parts)}])


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def hostile_cases(model: str, media_dir: str) -> list[Case]:
    return [
        *_malformed_bodies(),
        *_wrong_fields(base_chat(model, _small_png())),
        *_bad_messages(base_chat(model, _small_png())),
        *_bad_images(base_chat(model, _small_png()), media_dir),
        *_bad_completions(base_completion(model)),
        *_http_level(base_chat(model, _small_png())),
    ]


def _small_png() -> str:
    return data_url(encode_image(noise_image(32, 32, seed=5), "PNG"))


def _malformed_bodies() -> list[Case]:
    # fmt: off
    bodies = [b"", b"{", b"null", b"[]", b"123", b'"text"', b"{'a': 1}", b"\xff\xfe\x00", b"[" * 100_000,
              b'{"messages": [' * 5000, b'{"temperature": NaN}', b'{"temperature": 1e999}',
              b'{"messages": "hi"} trailing', b"\x00" * 64]
    # fmt: on
    return [Case(f"body {b[:12]!r}", b) for b in bodies] + [
        Case(f"completions body {b[:12]!r}", b, path=COMPLETIONS) for b in bodies[:6]
    ]


def _wrong_fields(base: dict) -> list[Case]:
    # fmt: off
    changes = [
        ("max_tokens", "5"), ("max_tokens", 1.5), ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", True),
        ("max_tokens", 1020), ("max_tokens", 2**40), ("max_completion_tokens", 0),
        ("temperature", "hot"), ("temperature", -1), ("top_p", 0), ("top_p", 2), ("top_k", -5),
        ("top_k", 2**40), ("min_p", 2), ("seed", 2**70), ("seed", -(2**70)), ("seed", "1"),
        ("stop", 5), ("stop", [""]), ("stop", ["a"] * 17), ("stop", [1]), ("stream", "yes"), ("stream", 1),
        ("stream_options", {"include_usage": True}), ("n", 2), ("n", 0), ("logprobs", 5),
        ("top_logprobs", 21), ("top_logprobs", 3), ("stop_token_ids", [-1]), ("stop_token_ids", [2**40]),
        ("logit_bias", {"1": 5}), ("frequency_penalty", 1), ("presence_penalty", 0.5),
        ("response_format", {"type": "json_object"}), ("tools", [{"type": "function"}]),
        ("tool_choice", "required"), ("foo", 1), ("max_token", 5), ("ignore_eos", "true"),
        ("return_token_ids", 1), ("epd_timings", None), ("model", 5), ("model", "gpt-4"),
        ("messages", "hi"), ("messages", {}), ("messages", []), ("messages", [None]), ("messages", [[]]),
    ]
    # fmt: on
    cases = [
        Case(f"{k}={v!r:.20}", with_(base, **{k: v}), 404 if k == "model" and v == "gpt-4" else 400)
        for k, v in changes
    ]
    missing = [Case(f"no {k}", {key: v for key, v in base.items() if key != k}) for k in ("messages",)]
    return cases + missing


def _bad_messages(base: dict) -> list[Case]:
    roles = ["bot", "", "SYSTEM", "function", None, 5]
    cases = [Case(f"role {r!r}", with_(base, messages=[{"role": r, "content": "hi"}])) for r in roles]
    # fmt: off
    parts = [
        {"type": "audio", "audio": "x"}, {"type": "input_audio"}, {"type": "image", "image": "x"},
        {"type": "file"}, {"text": "no type"}, {"type": 5}, {"type": "text"}, {"type": "text", "text": 5},
        {"type": "text", "text": "x", "extra": 1}, {"type": "image_url"},
        {"type": "image_url", "image_url": 5}, {"type": "image_url", "image_url": {"url": ""}},
        {"type": "image_url", "image_url": {"uri": "x"}},
        {"type": "image_url", "image_url": {"url": "x", "detail": "ultra"}}, "just a string", None, [],
    ]
    # fmt: on
    cases += [Case(f"part {p!r:.30}", with_content(base, p)) for p in parts]
    # fmt: off
    messages = [{"role": "user"}, {"role": "user", "content": None}, {"role": "user", "content": 5},
                {"content": "hi"}, {"role": "user", "content": "hi", "foo": 1}, {"role": "assistant"},
                {"role": "user", "content": {"type": "text", "text": "hi"}}]
    # fmt: on
    cases += [Case(f"message {m!r:.30}", with_(base, messages=[m])) for m in messages]
    # Special tokens typed in message text are plain text (InputProcessor.process_chat): no placeholder
    # forged, no turn injected, so these are valid requests.
    typed = ["<|image_pad|>", "<|vision_start|><|image_pad|><|vision_end|>", "<|video_pad|>"]
    cases += [Case(f"text {t[:15]!r}", with_(base, messages=[{"role": "user", "content": t}]), expect=200)
              for t in typed]  # fmt: skip
    cases += [Case("text 'word word '", with_(base, messages=[{"role": "user", "content": "word " * 3000}]))]
    # Past the limits checked before validation (epd.server.shape) or tokenizing (text_bound).
    cases.append(Case("2049 messages", with_(base, messages=[{"role": "user", "content": "hi"}] * 2049)))
    cases.append(Case("4097 parts", with_content(base, *[{"type": "text", "text": "a"}] * 4097)))
    too_long = [{"role": "user", "content": "w" * 50_000}]  # more characters than 1024 tokens hold
    cases.append(Case("text past the character bound", with_(base, messages=too_long)))
    return cases


def _bad_images(base: dict, media_dir: str) -> list[Case]:
    png = encode_image(noise_image(64, 64, seed=11), "PNG")
    corrupt = bytearray(png)
    corrupt[len(png) // 2 : len(png) // 2 + 64] = b"\x00" * 64
    big_bytes = b"\x89PNG\r\n\x1a\n" + random.Random(0).randbytes(2_200_000)
    urls = {
        "non-image bytes": data_url(b"hello, I am not an image at all"),
        "truncated png": data_url(png[: len(png) // 2]),
        "corrupt png": data_url(bytes(corrupt)),
        "empty data": "data:image/png;base64,",
        "bad base64": "data:image/png;base64,@@@@",
        "text media type": "data:text/plain;base64,aGVsbG8=",
        "over byte limit": data_url(big_bytes),
        "over pixel limit": data_url(png_header_only(2100, 2100)),
        "decompression bomb": data_url(png_header_only(100_000, 100_000)),
        "svg": data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
        "remote (not enabled)": "http://example.com/cat.png",
        "remote loopback": "http://127.0.0.1:1/x.png",
        "malformed http": "http:/etc/hostname",
        "ftp": "ftp://example.com/x.png",
        "javascript": "javascript:alert(1)",
        "outside media dir": "file:///etc/hostname",
        "traversal": f"file://{media_dir}/../../../etc/passwd",
        "relative traversal": "../../etc/passwd",
        "directory": f"file://{media_dir}",
        "missing file": f"file://{media_dir}/nope.png",
        "device": "/dev/zero",
        "nul in path": f"{media_dir}/allowed.png\x00.txt",  # os calls raise ValueError: was a 500
        "nul in file url": f"file://{media_dir}/a%00b.png",
        "reference to no lifted image": "epd-blob:7",  # the server's own references (epd.server.blobs)
    }
    cases = [Case(f"image {name}", with_content(base, image(url))) for name, url in urls.items()]
    nine = [image(data_url(encode_image(noise_image(32, 32, seed=s), "PNG"))) for s in range(9)]
    cases.append(Case("too many images", with_content(base, *nine)))
    return cases


def _bad_completions(base: dict) -> list[Case]:
    # fmt: off
    changes = [
        ("prompt", 5), ("prompt", None), ("prompt", []), ("prompt", [[1, 2], [3]]), ("prompt", ["a", "b"]),
        ("prompt", [2**40]), ("prompt", [-1]), ("prompt", [10**6]), ("prompt", "<|image_pad|>"),
        ("prompt", ""), ("echo", True), ("suffix", "x"), ("best_of", 2), ("logprobs", 21),
        ("logprobs", True), ("messages", []), ("max_tokens", 2000), ("prompt", [1] * 5000),
    ]
    # fmt: on
    return [Case(f"completions {k}={v!r:.20}", with_(base, **{k: v}), path=COMPLETIONS) for k, v in changes]


def _http_level(body: dict) -> list[Case]:
    return [
        Case("no api key", body, 401, auth=False),
        Case("wrong api key", body, 401, auth=False, headers={"Authorization": "Bearer nope"}),
        Case("basic auth", body, 401, auth=False, headers={"Authorization": "Basic c2stdGVzdA=="}),
        Case("unknown path", body, 404, path="/v1/embeddings"),
        Case("GET chat", None, 405, method="GET"),
    ]


def mutations(bases: list[tuple[str, dict]], n: int, seed: int) -> list[Case]:
    """n seeded random mutations of the valid base requests (structure or raw bytes)."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        path, base = rng.choice(bases)
        if rng.random() < 0.25:
            raw = bytearray(json.dumps(base).encode())
            for _ in range(rng.randint(1, 3)):
                _mutate_bytes(rng, raw)
            cases.append(Case(f"mutation {i} (bytes)", bytes(raw), expect=0, path=path))
        else:
            body = copy.deepcopy(base)
            for _ in range(rng.randint(1, 3)):
                body = _mutate(rng, body)
            cases.append(Case(f"mutation {i}", body, expect=0, path=path))
    return cases


# fmt: off
VALUES = [None, True, False, 0, -1, 1, 3, 2**31, 2**64, 1e308, -1e308, 0.5, "", "x", "a" * 1000, [], [1], {},
          {"a": 1}, [None], {"type": "text", "text": "hi"}, "data:image/png;base64,AAAA", "<|image_pad|>"]
# fmt: on


def _mutate(rng: random.Random, body: Any) -> Any:
    paths = list(json_paths(body))
    if not paths:
        return rng.choice(VALUES)
    path = rng.choice(paths)
    parent, key = resolve_path(body, path)
    op = rng.choice(["set", "set", "delete", "add", "wrap", "string"])
    if op == "set" or (op == "string" and not isinstance(parent[key], str)):
        parent[key] = copy.deepcopy(rng.choice(VALUES))
    elif op == "delete":
        del parent[key]
    elif op == "add" and isinstance(parent[key], dict):
        parent[key][rng.choice(["zzz", "type", "role", "url", "n", "stream"])] = copy.deepcopy(
            rng.choice(VALUES)
        )
    elif op == "wrap":
        parent[key] = [parent[key]]
    elif op == "string":
        s = parent[key]
        cut = rng.randint(0, len(s))
        parent[key] = s[:cut] + rng.choice(["", "\x00", "\ud800", "%", "=", "é"]) + s[cut + 1 :]
    return body


def json_paths(node: Any, prefix: tuple = ()) -> Any:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        yield (*prefix, key)
        yield from json_paths(value, (*prefix, key))


def resolve_path(body: Any, path: tuple) -> tuple[Any, Any]:
    for key in path[:-1]:
        body = body[key]
    return body, path[-1]


def _mutate_bytes(rng: random.Random, raw: bytearray) -> None:
    at = rng.randrange(len(raw))
    op = rng.choice(["delete", "insert", "flip", "truncate"])
    if op == "delete":
        del raw[at]
    elif op == "insert":
        raw.insert(at, rng.choice(b'{}[]",:0\\\x00\xff'))
    elif op == "flip":
        raw[at] ^= 1 << rng.randrange(8)
    else:
        del raw[at:]

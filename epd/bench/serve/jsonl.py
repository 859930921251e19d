"""The `jsonl` workload: replay a file of chat requests, one JSON object per line.

A line is a /v1/chat/completions body (`{"messages": [...], "max_tokens": 64, ...}`) or an
OpenAI batch-API line (`{"custom_id": ..., "body": {...}}`). An optional top-level `expected`
(or `answer`) string is not sent: the reply is scored against it with the demo task's exact
match. Images given as local paths (absolute, or relative to the file) are inlined as data
URLs, so a dataset folder can be replayed as it is. The benchmark owns `model`, `stream` and
`stream_options`; `--output-tokens` overrides each line's `max_tokens`. Lines are used in
order and the file is cycled when --num-requests asks for more.
"""

from __future__ import annotations

import base64
import json
import mimetypes
from pathlib import Path

from epd.bench.serve.workload import BenchRequest

OWNED_BY_BENCH = ("model", "stream", "stream_options", "max_tokens", "max_completion_tokens")
REMOTE_PREFIXES = ("data:", "http://", "https://")


def jsonl_requests(path: str, n: int, output_tokens: int | None) -> list[BenchRequest]:
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no requests")
    base = Path(path).resolve().parent
    parsed = [_parse_line(line, base, output_tokens, f"{path}:{i + 1}") for i, line in enumerate(lines)]
    return [parsed[i % len(parsed)] for i in range(n)]


def _parse_line(line: str, base: Path, output_tokens: int | None, where: str) -> BenchRequest:
    record = json.loads(line)
    body = dict(record.get("body", record))
    expected = record.get("expected", record.get("answer"))
    for key in ("expected", "answer", "custom_id", "method", "url"):
        body.pop(key, None)
    if not isinstance(body.get("messages"), list):
        raise ValueError(f"{where}: no 'messages' list")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if output_tokens is not None:
        max_tokens = output_tokens
    messages = [_inline_images(m, base) for m in body["messages"]]
    extra = {k: v for k, v in body.items() if k not in OWNED_BY_BENCH and k != "messages"}
    return BenchRequest(messages, max_tokens, _count_images(messages), extra, expected)


def _inline_images(message: dict, base: Path) -> dict:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        url = part.get("image_url", {}).get("url") if part.get("type") == "image_url" else None
        if url is not None and not url.startswith(REMOTE_PREFIXES):
            part = {**part, "image_url": {**part["image_url"], "url": _file_data_url(url, base)}}
        parts.append(part)
    return {**message, "content": parts}


def _file_data_url(url: str, base: Path) -> str:
    path = Path(url.removeprefix("file://"))
    path = path if path.is_absolute() else base / path
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _count_images(messages: list[dict]) -> int:
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if part.get("type") == "image_url"
    )

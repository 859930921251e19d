"""Local media that is not a regular file, named under --allowed-local-media-path: a 400, at once.

Opening a FIFO for reading waits for a writer. When the loader opened first and checked the
file type after, a FIFO that nobody writes to held an input-processing thread forever, and a
handful of them took every thread: later requests waited too, while /health still said 200.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from epd.testing.fifo import release_fifo

from .conftest import MODEL_NAME
from .helpers import ServerProcess

# More requests than the server has input threads (asyncio.to_thread: min(32, cores + 4)), so
# requests left blocked would starve the normal request that follows.
CONCURRENT_FIFO_REQUESTS = 8
# Generous: a refusal takes milliseconds; only a request blocked on the FIFO comes near it.
ANSWER_WITHIN_S = 30.0


def chat_body(image_url: str) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "hi"}]
    return {"model": MODEL_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": content}]}


def post_chat(server: ServerProcess, body: dict) -> httpx.Response | None:
    """The server's answer, or None if none came within ANSWER_WITHIN_S."""
    try:
        return httpx.post(
            server.url + "/v1/chat/completions", json=body, headers=server.headers(), timeout=ANSWER_WITHIN_S
        )
    except httpx.TimeoutException:
        return None


@pytest.fixture
def fifo(media_dir: Path) -> Iterator[Path]:
    """A FIFO nobody writes to, inside the shared server's allowed media directory."""
    folder = media_dir / f"pipes-{uuid.uuid4().hex}"
    folder.mkdir()
    path = folder / "pipe.png"
    os.mkfifo(path)
    yield path
    # Should a server thread still wait on it, wake it: the shared server must drain at teardown.
    release_fifo(path)
    folder.rmdir()


def test_fifo_gets_a_400_and_starves_no_other_request(server: ServerProcess, media_dir: Path, fifo: Path):
    with ThreadPoolExecutor(CONCURRENT_FIFO_REQUESTS) as pool:
        answers = list(
            pool.map(
                lambda _: post_chat(server, chat_body(f"file://{fifo}")), range(CONCURRENT_FIFO_REQUESTS)
            )
        )
    for answer in answers:
        assert answer is not None, f"no answer within {ANSWER_WITHIN_S} s: blocked opening the FIFO"
        assert answer.status_code == 400, answer.text
        assert "is a FIFO (named pipe), not a regular file" in answer.json()["error"]["message"]

    normal = post_chat(server, chat_body(f"file://{media_dir}/allowed.png"))
    assert normal is not None, f"a normal request got no answer within {ANSWER_WITHIN_S} s"
    assert normal.status_code == 200, normal.text
    assert normal.json()["usage"]["prompt_tokens"] > 20  # the image's tokens are in the prompt

"""A chat request's messages (whose images are slices of its body) are let go of once they are
processed, not kept until the response is sent (epd.server.chat._processed_once)."""

from __future__ import annotations

import gc
import weakref

from epd.server.chat import _processed_once


class _Part:
    """Stands in for an image of the messages (a DataURL holding a slice of the body)."""


class _Engine:
    """What `_processed_once` calls: the processor's `process_chat`, then `prepare_images`."""

    def __init__(self) -> None:
        self.processor = self
        self.seen: list[int] = []

    def process_chat(self, messages: list[dict]) -> str:
        self.seen.append(len(messages))
        return "prompt"

    def prepare_images(self, prompt: str) -> str:
        return prompt + " ready"


def test_the_messages_go_once_processed() -> None:
    engine, part = _Engine(), _Part()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": part}}]}]
    gone = weakref.ref(part)
    process = _processed_once(engine, messages)  # type: ignore[arg-type]
    del messages, part
    gc.collect()
    assert gone() is not None  # held until processed
    assert process() == "prompt ready" and engine.seen == [1]
    gc.collect()
    assert gone() is None  # while `process` itself lives on (the request's Generation holds it)

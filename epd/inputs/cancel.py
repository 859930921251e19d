"""Stopping a request's image work once nobody waits for it (the client left, the server drains).

A thread cannot be killed, so the work checks an event between its steps: `load_images` between
two images (reading a file or fetching a URL may take long), `PatchPool.prepare` while it waits
for the pool to decode. The server sets the event around a request's whole input processing.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ImageLoadingCancelled(Exception):
    """Image work stopped between two steps: whoever wanted the images is gone."""


_image_loading_cancel: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "epd_image_loading_cancel", default=None
)


@contextmanager
def cancel_image_loading_on(event: threading.Event) -> Iterator[None]:
    """Within the block, in this thread, image work raises ImageLoadingCancelled at its next
    step once `event` is set.

    A context variable rather than an argument: the server sets it around a request's whole
    input processing, and images are loaded deep inside `process_chat`.
    """
    token = _image_loading_cancel.set(event)
    try:
        yield
    finally:
        _image_loading_cancel.reset(token)


def image_loading_cancel_event() -> threading.Event | None:
    """The event of the enclosing `cancel_image_loading_on`, if any."""
    return _image_loading_cancel.get()


def stop_if_cancelled(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise ImageLoadingCancelled()

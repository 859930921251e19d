"""Factories for driving a RouterCore by hand: fake instances of a layout, prompts, instance messages.

The instances are only names here: `InstanceReady` data for each, an is_alive probe the test can
flip, and helpers that build the messages a real instance would send.
"""

from __future__ import annotations

import torch

from epd.clock import VirtualClock
from epd.cluster.layout import InstanceSpec, Layout, Role
from epd.cluster.messages import (
    EmbeddingArrived,
    EncodeDone,
    InstanceReady,
    NeedEmbeddings,
    RequestUpdate,
)
from epd.cluster.router import InstanceHandle, RouterCore
from epd.inputs.types import ImageInput, PlaceholderRange, ProcessedPrompt
from epd.lifetime import Event, LifetimeEvent

MAX_MODEL_LEN = 4096


def data_address(name: str) -> str:
    return f"data://{name}"


class FakeLayout:
    """The handles of a layout's instances, each alive until `kill`."""

    def __init__(self, text: str) -> None:
        self.alive: dict[str, bool] = {}
        self.handles = [self._handle(spec) for spec in Layout.parse(text).instances("cpu")]

    def _handle(self, spec: InstanceSpec) -> InstanceHandle:
        name = spec.name
        self.alive[name] = True
        max_len = MAX_MODEL_LEN if spec.has(Role.PREFILL) else 0
        ready = InstanceReady(name, f"ctl://{name}", data_address(name), 0, 0, 0, max_len)
        return InstanceHandle(spec, ready, lambda: self.alive[name])

    def kill(self, name: str) -> None:
        self.alive[name] = False


def make_core(layout: str) -> tuple[RouterCore, FakeLayout, VirtualClock]:
    fake = FakeLayout(layout)
    clock = VirtualClock(1000.0)
    return RouterCore(fake.handles, clock), fake, clock


def image(content_hash: str, side: int = 2) -> ImageInput:
    """An image of side x side patches; its pixels do not matter to the router."""
    patches = side * side
    return ImageInput(
        torch.zeros(patches, 1),
        (1, side, side),
        content_hash,
        raw_patches=torch.zeros(patches, 6, dtype=torch.uint8),
    )


def prompt(num_tokens: int = 8, images: list[ImageInput] | None = None) -> ProcessedPrompt:
    images = images or []
    placeholders = [PlaceholderRange(i, 1) for i in range(len(images))]
    return ProcessedPrompt(list(range(num_tokens)), images, placeholders, "a prompt")


def need(instance: str, request_id: str, items: list[int]) -> NeedEmbeddings:
    return NeedEmbeddings(instance, request_id, items)


def encode_done(instance: str, request_id: str, items: list[int]) -> EncodeDone:
    return EncodeDone(instance, request_id, items, [], [])


def arrived(instance: str, content_hash: str, encoder: str, request_ids: list[str]) -> EmbeddingArrived:
    events = [(rid, LifetimeEvent(Event.MM_TRANSFER_END, 0.0, instance)) for rid in request_ids]
    return EmbeddingArrived(instance, content_hash, data_address(encoder), events)


def update(
    instance: str, request_id: str, tokens: list[int], first_index: int, finish: str | None = None
) -> RequestUpdate:
    text = "done" if finish is not None else None
    return RequestUpdate(instance, request_id, tokens, None, [], finish, None, text, 0, False, first_index)

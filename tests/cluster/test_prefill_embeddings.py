"""A prefill core and the images its tasks need: which it waits for, which it asks for, what it reports.

The router sends a request's images to the encoders with the task and lists them in it (`encoding`);
P must then wait without asking, also when an image came before its task, and ask only for an
image it lacks that nobody sends (epd.cluster.instance.prefill_stage). Real P core on the tiny
checkpoint; the embeddings arrive as the connector would hand them over.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from epd.clock import VirtualClock
from epd.cluster.instance import InstanceConfig, InstanceCore, ListOutbox
from epd.cluster.layout import Layout
from epd.cluster.messages import (
    EmbeddingArrived,
    EmbeddingsEvicted,
    EmbeddingsLost,
    NeedEmbeddings,
    PrefillTask,
    RequestUpdate,
)
from epd.entrypoints.async_engine import EngineArgs
from epd.sampling_params import SamplingParams
from epd.transfer.base import Received, create_connector

GRID = (1, 2, 4)  # 8 patches, 2 image tokens after the 2x2 merge
IMAGE_TOKENS = 2
ENCODER = "shm://encoder"


@pytest.fixture
def prefill(checkpoints) -> Iterator[tuple[InstanceCore, ListOutbox]]:
    """PD0 of 1E+1PD (it decodes too: no hand-off to wire), with MM cache room for two images."""
    model = str(checkpoints["qwen2_5_vl"])
    engine = EngineArgs(model=model, block_size=4, num_kv_blocks=256).engine_config()
    hidden = engine.model.hf.text.hidden_size
    spec = next(s for s in Layout.parse("1E+1PD").instances("cpu") if s.name == "PD0")
    cfg = InstanceConfig(spec, engine, "inproc://no-router", "shm", mm_cache_bytes=2 * 16 * hidden * 4)
    with create_connector("shm", device="cpu") as connector:
        outbox = ListOutbox()
        yield InstanceCore(cfg, connector, outbox, VirtualClock()), outbox


def task(request_id: str, hashes: list[str], encoding: list[int]) -> PrefillTask:
    """A prompt of 3 text tokens, then each image's tokens."""
    n = 3 + IMAGE_TOKENS * len(hashes)
    placeholders = [(3 + IMAGE_TOKENS * i, IMAGE_TOKENS) for i in range(len(hashes))]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    return PrefillTask(
        request_id,
        list(range(1, n + 1)),
        placeholders,
        hashes,
        [GRID] * len(hashes),
        params,
        0.0,
        None,
        encoding=encoding,
    )


def arrive(core: InstanceCore, content_hash: str) -> None:
    hidden = core.mm_cache.hidden_size
    embeds = torch.full((IMAGE_TOKENS, hidden), float(len(content_hash)))
    meta = {"content_hash": content_hash, "source": ENCODER}
    core.on_transfer(Received(f"mm:{content_hash}", {"embeds": embeds}, meta, embeds.nbytes, 0.0))


def kinds(messages: list) -> list[str]:
    return [type(m).__name__ for m in messages if not isinstance(m, RequestUpdate)]


def first_tokens(core: InstanceCore, outbox: ListOutbox) -> set[str]:
    """Step the engine once: the requests that got their first token."""
    core.step()
    return {m.request_id for m in outbox.take() if isinstance(m, RequestUpdate) and m.new_token_ids}


def test_an_image_the_task_says_is_coming_is_waited_for_without_asking(prefill):
    core, outbox = prefill
    core.on_message(task("a", ["x"], encoding=[0]))
    core.on_message(task("b", ["x"], encoding=[]))  # the router sent "x" once, for a
    assert kinds(outbox.take()) == [], "nothing to ask: x is on its way"
    assert first_tokens(core, outbox) == set()

    arrive(core, "x")

    [report] = outbox.take()
    assert isinstance(report, EmbeddingArrived) and report.content_hash == "x"
    assert [rid for rid, _ in report.events] == ["a", "b"]
    assert first_tokens(core, outbox) == {"a", "b"}


def test_an_image_that_came_before_its_task_is_used_not_waited_for(prefill):
    core, outbox = prefill
    arrive(core, "x")  # the transfer overtook the task (connector and control socket are apart)
    assert kinds(outbox.take()) == ["EmbeddingArrived"]

    core.on_message(task("a", ["x"], encoding=[0]))

    assert kinds(outbox.take()) == []
    assert first_tokens(core, outbox) == {"a"}
    assert not core.prefill.announced and not core.prefill.unannounced, "matched: nothing more to come"


def test_an_image_the_router_thought_cached_but_p_lacks_is_asked_for(prefill):
    core, outbox = prefill
    core.on_message(task("a", ["x", "y"], encoding=[1]))  # the router believed P held "x"

    assert outbox.take() == [NeedEmbeddings("PD0", "a", [0])]
    arrive(core, "y")
    arrive(core, "x")
    outbox.take()
    assert first_tokens(core, outbox) == {"a"}


def test_a_lost_image_is_asked_for_again_by_a_request_still_waiting(prefill):
    core, outbox = prefill
    core.on_message(task("a", ["x"], encoding=[0]))
    core.on_message(task("b", ["x"], encoding=[]))
    core.on_message(task("c", ["z", "x"], encoding=[0]))
    outbox.take()

    core.on_message(EmbeddingsLost(["x"]))  # its encoder died

    assert outbox.take() == [NeedEmbeddings("PD0", "a", [0])], "asked once, for the first waiter"
    arrive(core, "x")
    arrive(core, "z")
    outbox.take()
    assert first_tokens(core, outbox) == {"a", "b", "c"}


def test_evictions_are_reported_so_the_router_stops_counting_on_them(prefill):
    core, outbox = prefill
    for rid, content_hash in (("a", "x"), ("b", "y")):
        core.on_message(task(rid, [content_hash], encoding=[0]))
        arrive(core, content_hash)
    first_tokens(core, outbox)  # both prefilled: x and y stay cached, unpinned
    outbox.take()

    core.on_message(task("c", ["z"], encoding=[0]))
    arrive(core, "z")  # room for two: the least recently used goes

    assert [m for m in outbox.take() if isinstance(m, EmbeddingsEvicted)] == [EmbeddingsEvicted("PD0", ["x"])]

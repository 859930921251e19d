"""Role switches for every pair of roles, under load, in one process: the real router core and its
role switches, real instance cores (the tiny checkpoint's weights, both parts in host memory) and
real shm connectors between them; every message crosses the wire format (msgspec) as between
processes. Tokens are checked against transformers (CPU, fp32, greedy); what a seeded request
draws against the same run without the switch. Every wait is for a state, bounded."""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import msgspec
import pytest
import torch

from epd.cluster.instance import InstanceConfig, InstanceCore, ListOutbox
from epd.cluster.layout import Layout, Role
from epd.cluster.messages import SetRolesReply, decode_for_instance, decode_for_router, encode
from epd.cluster.router import InstanceHandle, RouterCore
from epd.cluster.router.ledger import Work
from epd.cluster.router.role_switch import RoleSwitches, SwitchInProgress, SwitchRefused
from epd.entrypoints.async_engine import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.inputs.types import ProcessedPrompt
from epd.lifetime import Event
from epd.outputs import RequestOutput
from epd.sampling_params import SamplingParams
from epd.testing.images import noise_image
from epd.testing.reference import hf_greedy, load_hf_model
from epd.transfer.base import create_connector

WAIT_S = 120.0  # a bound on waiting for a state, never a guess at how long it takes
MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def user(text: str, images: int = 0) -> str:
    return f"<|im_start|>user\n{IMAGE * images}{text}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = [
    user("count the sheep"),
    {"prompt": user("what is this", 1), "multi_modal_data": {"image": [noise_image(64, 48, seed=1)]}},
    user("a long walk by the river in the morning"),
    {"prompt": user("compare", 2), "multi_modal_data": {"image": [noise_image(40, 72, seed=2)] * 2}},
]


class InProcessCluster:
    """A layout's instance cores and a router core in this process, turned in layout order."""

    def __init__(self, model: str, layout: str, stack: ExitStack, switchable: bool = True) -> None:
        engine = EngineArgs(model=model, block_size=4, num_kv_blocks=96).engine_config()
        self.cores: dict[str, InstanceCore] = {}
        handles = []
        for spec in Layout.parse(layout).instances("cpu"):
            cfg = InstanceConfig(
                spec, engine, "inproc://router", "shm", mm_cache_bytes=4 << 20, switchable_roles=switchable
            )
            connector = stack.enter_context(create_connector("shm", device="cpu"))
            core = InstanceCore(cfg, connector, ListOutbox())
            self.cores[spec.name] = core
            ready = decode_for_router(encode(core.ready_message(f"inproc://{spec.name}")))
            handles.append(InstanceHandle(spec, ready, lambda: True))
        self.router = RouterCore(handles)
        self.switches = RoleSwitches(self.router, drain_timeout_s=WAIT_S)
        self.inboxes: dict[str, deque] = {name: deque() for name in self.cores}
        self.streams: dict[str, list[list[int]]] = {}  # request id -> its token lists as they grew
        self.done: dict[str, RequestOutput] = {}

    def add(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams) -> None:
        self._deliver(self.router.add_request(request_id, prompt, params))

    def switch(self, name: str, roles: str) -> dict:
        """Start a switch; its record once it ended (turning the cluster meanwhile)."""
        ended: list[dict] = []
        _, out = self.switches.request(name, roles, ended.append)
        self._deliver(out)
        self.turn_until(lambda: bool(ended), f"the switch of {name} to {roles}")
        return ended[0]

    def turn(self) -> None:
        for name, core in self.cores.items():
            inbox = self.inboxes[name]
            while inbox:
                core.on_message(decode_for_instance(encode(inbox.popleft())))
            core.receive_transfers()
            core.step()
            for message in core.outbox.take():
                message = decode_for_router(encode(message))
                self._deliver(self.router.handle(message))
                if isinstance(message, SetRolesReply):
                    self.switches.on_reply(message)
        self._deliver(self.router.tick())
        self._deliver(self.switches.tick())
        for output in self.router.take_outputs():
            self.streams.setdefault(output.request_id, []).append(list(output.outputs[0].token_ids))
            if output.finished:
                self.done[output.request_id] = output

    def turn_until(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not done():
            assert time.monotonic() < deadline, f"{what}: not within {WAIT_S} s"
            self.turn()

    def decoding_on(self, name: str) -> list[str]:
        """Requests whose decode runs on `name` with their KV there (it sent a token)."""
        holder = self.router.ledger.holder
        return [
            rid
            for rid in self.router.requests
            if holder(Work(rid, Role.DECODE)) == name and holder(Work(rid, Role.PREFILL)) is None
        ]

    def _deliver(self, outgoing) -> None:
        for instance, message in outgoing:
            self.inboxes[instance].append(message)


class Load:
    """A closed loop over PROMPTS: `width` requests in flight, the next sent as one finishes."""

    def __init__(self, cluster: InProcessCluster, prompts: list[ProcessedPrompt], width: int = 4) -> None:
        self.cluster, self.prompts, self.width = cluster, prompts, width
        self.sent: dict[str, int] = {}  # request id -> prompt index

    def keep_up(self) -> None:
        while len(self.sent) - len(self.cluster.done) < self.width:
            rid = f"r{len(self.sent)}"
            self.sent[rid] = len(self.sent) % len(self.prompts)
            self.cluster.add(rid, self.prompts[self.sent[rid]], GREEDY)

    def turn_until(self, done: Callable[[], bool], what: str) -> None:
        def fed() -> bool:
            self.keep_up()
            return done()

        self.cluster.turn_until(fed, what)

    def finish(self) -> None:
        self.cluster.turn_until(lambda: len(self.cluster.done) == len(self.sent), "the last requests")


@pytest.fixture(scope="module")
def model(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def processed(model: str) -> list[ProcessedPrompt]:
    processor = InputProcessor.from_pretrained(model)
    return [processor.process_prompt(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(model: str, processed: list[ProcessedPrompt]) -> list[list[int]]:
    """Each prompt's greedy tokens from transformers (a run with no switch at all)."""
    hf = load_hf_model(model)
    tokens = []
    for prompt in processed:
        mm = {}
        if prompt.images:
            mm = dict(
                pixel_values=torch.cat([img.pixel_values for img in prompt.images]),
                image_grid_thw=torch.tensor([img.grid_thw for img in prompt.images]),
            )
        tokens.append(hf_greedy(hf, prompt.prompt_token_ids, MAX_TOKENS, **mm)[0])
    return tokens


@pytest.fixture
def cluster(model: str) -> Iterator[Callable[..., InProcessCluster]]:
    with ExitStack() as stack:
        yield lambda layout, **kw: InProcessCluster(model, layout, stack, **kw)


def assert_streams_whole(cluster: InProcessCluster, load: Load, reference: list[list[int]]) -> None:
    """Every request sent ended once, with the reference tokens; its stream only ever grew."""
    assert set(cluster.done) == set(load.sent)
    for rid, index in load.sent.items():
        out = cluster.done[rid]
        assert out.error is None and out.outputs[0].finish_reason == "length", (rid, out.error)
        assert out.outputs[0].token_ids == reference[index], f"{rid} (prompt {index})"
        stream = cluster.streams[rid]
        for before, after in zip(stream, stream[1:]):
            assert after[: len(before)] == before, f"{rid}: a token changed or repeated mid-stream"
    assert cluster.router.ledger.is_empty() and not cluster.router.requests


def assert_no_block_held(cluster: InProcessCluster) -> None:
    for name, core in cluster.cores.items():
        if core.engine is not None:
            blocks = core.engine.block_manager
            assert blocks.num_free_blocks == blocks.num_blocks, f"{name} holds KV blocks"
            assert not core.engine.requests
        for cache in (core.mm_cache, core.encode and core.encode.worker.cache):
            assert cache is None or cache.used_blocks == cache.evictable_blocks, f"{name} pins MM blocks"


def test_every_pair_of_roles_switches_under_load_and_changes_no_token(cluster, processed, reference):
    c = cluster("2E+2P+2D")
    load = Load(c, processed)
    records = []
    # E0 goes round both ways: E -> P -> D -> E, then E -> D -> P -> E (all six ordered pairs).
    for roles in ("P", "D", "E", "D", "P", "E"):
        load.turn_until(lambda: len(c.done) >= 2 * len(records) + 2, "answers before the switch")
        if records and records[-1]["to"] == "D":
            load.turn_until(lambda: bool(c.decoding_on("E0")), "a decode running on E0")
        records.append(c.switch("E0", roles))
    load.turn_until(lambda: len(c.done) >= 2 * len(records) + 2, "answers after the last switch")
    load.finish()

    assert_streams_whole(c, load, reference)
    assert_no_block_held(c)
    assert [(r["from"], r["to"], r["state"], r["error"]) for r in records] == [
        ("E", "P", "done", None),
        ("P", "D", "done", None),
        ("D", "E", "done", None),
        ("E", "D", "done", None),
        ("D", "P", "done", None),
        ("P", "E", "done", None),
    ]
    for r in records:
        t = r["timings"]
        assert t["total"] == pytest.approx(t["drain"] + t["reconfigure"] + t["rejoin"])
        assert t["reconfigure"] >= t["weights"] + t["memory"] - 1e-6
        moves_weights = "E" in r["from"] + r["to"]
        assert (t["weights"] > 0) == moves_weights, r
    # Leaving D, E0 handed its running decodes to D0/D1 instead of waiting for them to end.
    assert all(r["migrated"] >= 1 for r in records if r["from"] == "D"), records
    assert c.cores["E0"].roles == {Role.ENCODE} and c.cores["E0"].engine is None


def test_a_decode_moves_with_its_kv_and_its_stream_goes_on_without_a_gap(cluster, processed, reference):
    c = cluster("1E+1P+2D")
    long = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    c.add("moved", processed[1], long)
    c.turn_until(lambda: "moved" in c.decoding_on("D0"), "the request decoding on D0")
    c.turn_until(lambda: len(c.streams["moved"][-1]) >= 3, "a few tokens on D0")

    record = c.switch("D0", "P")
    assert "moved" not in c.done, "the switch did not wait for the request to end"
    c.turn_until(lambda: "moved" in c.done, "the moved request's end")

    assert record["migrated"] == 1 and record["state"] == "done"
    out = c.done["moved"]
    assert out.outputs[0].token_ids == reference[1]
    events = [(e.event, e.instance) for e in out.metrics.events]
    assert (Event.KV_TRANSFER_START, "D0") in events and (Event.KV_TRANSFER_END, "D1") in events
    assert c.cores["D0"].stats()["requests_migrated_total"] == 1
    assert_no_block_held(c)


def test_a_seeded_request_draws_the_same_tokens_when_moved(cluster, processed):
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True)
    still = cluster("1E+1P+2D")
    still.add("s", processed[2], seeded)
    still.turn_until(lambda: "s" in still.done, "the request without a switch")

    moved = cluster("1E+1P+2D")
    moved.add("s", processed[2], seeded)
    moved.turn_until(lambda: len(moved.streams.get("s", [[]])[-1]) >= 4, "four tokens")
    decoder = next(name for name in ("D0", "D1") if "s" in moved.decoding_on(name))
    assert moved.switch(decoder, "P")["migrated"] == 1
    moved.turn_until(lambda: "s" in moved.done, "the moved request's end")

    assert moved.done["s"].outputs[0].token_ids == still.done["s"].outputs[0].token_ids


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_twenty_switches_back_and_forth_leak_no_block_and_no_host_memory(cluster, processed, reference):
    c = cluster("2E+1P+1D")
    host = c.cores["E1"].host
    sizes = []
    for i in range(20):
        record = c.switch("E1", "D" if i % 2 == 0 else "E")
        assert record["state"] == "done", record
        rid = f"q{i}"
        c.add(rid, processed[i % len(processed)], GREEDY)
        c.turn_until(lambda rid=rid: rid in c.done, f"request {rid}")
        sizes.append(live_tensor_bytes())

    assert c.cores["E1"].host is host, "the host copy was loaded once"
    # The first rounds make a few small tensors once (512 bytes); from then on each round trip ends
    # where the last one did: a leaked KV cache or weight copy would add megabytes per round.
    assert sizes[6::2] == [sizes[4]] * 7 and sizes[7::2] == [sizes[5]] * 7, sizes
    assert sizes[5] - sizes[4] > 1 << 20, "as D it holds a KV cache, as E it does not"
    for i in range(20):
        assert c.done[f"q{i}"].outputs[0].token_ids == reference[i % len(processed)]
    assert_no_block_held(c)
    assert c.router.ledger.is_empty()


def test_a_second_switch_while_one_runs_is_refused_and_the_first_still_ends(cluster, processed):
    c = cluster("2E+1P+2D")
    c.add("img", processed[1], GREEDY)  # its image goes to an encoder: E0 (the first, least loaded)
    assert c.router.ledger.load("E0") > 0
    first, out = c.switches.request("E0", "D")
    assert first.state.value == "draining" and out == []

    with pytest.raises(SwitchInProgress, match="E0 is already switching from E to D .draining.; wait"):
        c.switches.request("E0", "P")
    with pytest.raises(SwitchRefused, match="no other live instance takes E while it drains"):
        c.switches.request("E1", "P")

    c.turn_until(lambda: not c.switches.busy() and "img" in c.done, "the first switch and the request")
    assert first.state.value == "done" and c.cores["E0"].roles == {Role.DECODE}


def test_without_host_copies_e_stays_and_the_refusal_says_how(cluster):
    c = cluster("2E+1P+1D", switchable=False)
    with pytest.raises(SwitchRefused, match="removing E is not supported.*--switchable-roles"):
        c.switches.request("E0", "P")
    reply = c.cores["P0"].set_roles("EP")
    assert reply.roles == "P" and "--switchable-roles" in reply.error
    assert msgspec.json.decode(msgspec.json.encode(reply), type=SetRolesReply) == reply

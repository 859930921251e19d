"""The router and the instances of one host talk over Unix sockets; an instance that cannot see the
router's socket directory (another host) falls back to TCP, and the directory goes with the cluster.

Real zmq sockets and, last, a real cluster of processes on the tiny checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from epd.cluster.cluster import Cluster
from epd.cluster.layout import Layout
from epd.cluster.local_sockets import SocketDir, bind_inbox, bind_router_locally, reach_router
from epd.entrypoints.async_engine import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.sampling_params import SamplingParams

IMAGE_PAD = "<|vision_start|><|image_pad|><|vision_end|>"
WAIT_S = 120.0  # a bound on each wait for a state, not a guess at how long work takes


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def round_trip(ctx: zmq.Context, inbox: zmq.Socket, address: str) -> bytes:
    push = ctx.socket(zmq.PUSH)
    push.connect(address)
    push.send(b"hello " + address.encode())
    assert inbox.poll(int(WAIT_S * 1000)), f"nothing arrived at {address}"
    return inbox.recv()


def test_an_inbox_in_a_visible_directory_is_a_unix_socket_there(ctx):
    sockets = SocketDir()
    try:
        inbox = ctx.socket(zmq.PULL)
        address = bind_inbox(inbox, "127.0.0.1", sockets.path, "E0")
        assert address.startswith(f"ipc://{sockets.path}/E0-")
        assert os.path.exists(address.removeprefix("ipc://"))
        assert round_trip(ctx, inbox, address) == b"hello " + address.encode()
    finally:
        sockets.remove()
    assert not os.path.exists(sockets.path)


def test_an_instance_that_does_not_see_the_directory_binds_tcp(ctx, tmp_path: Path):
    elsewhere = str(tmp_path / "on-another-host")  # the router's directory, as another host sees it
    inbox = ctx.socket(zmq.PULL)
    address = bind_inbox(inbox, "127.0.0.1", elsewhere, "P0")
    assert address.startswith("tcp://127.0.0.1:")
    assert round_trip(ctx, inbox, address) == b"hello " + address.encode()
    assert reach_router(elsewhere, "tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
    assert bind_inbox(ctx.socket(zmq.PULL), "127.0.0.1", None, "P1").startswith("tcp://")


def test_a_path_too_long_for_a_unix_socket_falls_back_to_tcp(ctx, tmp_path: Path):
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    inbox = ctx.socket(zmq.PULL)
    assert bind_inbox(inbox, "127.0.0.1", str(deep), "D0").startswith("tcp://")
    bind_router_locally(ctx.socket(zmq.PULL), str(deep))  # skipped, not an error
    assert reach_router(str(deep), "tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"


def test_instances_reach_the_router_by_its_unix_socket_once_it_is_bound(ctx):
    sockets = SocketDir()
    try:
        tcp = "tcp://127.0.0.1:5555"
        assert reach_router(sockets.path, tcp) == tcp  # nothing bound there yet
        inbox = ctx.socket(zmq.PULL)
        bind_router_locally(inbox, sockets.path)
        address = reach_router(sockets.path, tcp)
        assert address == f"ipc://{sockets.path}/router"
        assert round_trip(ctx, inbox, address).startswith(b"hello ipc://")
    finally:
        sockets.remove()


def test_a_local_cluster_talks_over_unix_sockets_and_removes_them(checkpoints):
    model = str(checkpoints["qwen2_5_vl"])
    engine = EngineArgs(model=model, block_size=4, num_kv_blocks=512).engine_config()
    cluster = Cluster(Layout.parse("1E+1PD"), engine)
    directory = cluster.sockets.path
    try:
        addresses = {h.name: h.ready.control_address for h in cluster.router.core.instances.values()}
        assert addresses and all(a.startswith(f"ipc://{directory}/") for a in addresses.values()), addresses
        processor = InputProcessor.from_pretrained(model)
        prompt = processor.process_prompt(
            {"prompt": f"{IMAGE_PAD}what is this", "multi_modal_data": {"image": [_image()]}}
        )
        cluster.add_request("r0", prompt, SamplingParams(temperature=0, max_tokens=3))
        finished = []
        deadline = time.monotonic() + WAIT_S
        while not finished and time.monotonic() < deadline:
            finished = [o for o in cluster.step() if o.finished]
        assert finished, f"no answer within {WAIT_S} s"
        assert finished[0].error is None and len(finished[0].outputs[0].token_ids) == 3
    finally:
        cluster.shutdown()
    assert not os.path.exists(directory)


def _image():
    from PIL import Image

    return Image.new("RGB", (64, 48), (200, 30, 30))


def test_directories_of_routers_that_no_longer_run_are_removed_by_the_next(tmp_path: Path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now names no process (or a later one, with another start time)
    abandoned = tmp_path / "epd-sockets-killed"
    abandoned.mkdir()
    (abandoned / "owner").write_text(f"{gone.pid} 1")
    (abandoned / "router").write_text("")  # what a killed router leaves
    alive = SocketDir(str(tmp_path))  # its owner runs: this process
    unowned = tmp_path / "epd-sockets-just-made"  # made, its owner not written yet
    unowned.mkdir()
    other = tmp_path / "unrelated"
    other.mkdir()

    SocketDir(str(tmp_path)).remove()
    assert not abandoned.exists()
    assert os.path.isdir(alive.path) and unowned.is_dir() and other.is_dir()
    alive.remove()

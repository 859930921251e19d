"""Liveness by heartbeat: instances live exactly as long as the router process that beats for them.

The sender alone and the instance's silence rule (on a virtual clock) first; then real processes:
a router process killed with SIGKILL leaves no instance behind, and an idle cluster that nobody
drives keeps its instances past several timeouts.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from epd.clock import VirtualClock
from epd.cluster.cluster import Cluster
from epd.cluster.heartbeat import HeartbeatSender, heartbeat_interval
from epd.cluster.instance import Instance, InstanceConfig
from epd.cluster.layout import Layout
from epd.cluster.messages import Heartbeat, decode_for_instance, encode
from epd.entrypoints.async_engine import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.sampling_params import SamplingParams

WAIT_S = 120.0  # an overall bound on each wait for a state, never a guess at how long work takes
SHORT_TIMEOUT_S = 1.5
# After the router dies: the timeout, a poll turn, and room for a loaded machine to schedule it.
EXIT_BOUND_S = SHORT_TIMEOUT_S + 15.0


def engine_config(model: str):
    return EngineArgs(model=model, block_size=4, num_kv_blocks=512).engine_config()


def process_running(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: an orphan's new parent may be slow to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


# ---- the sender ----------------------------------------------------------------------------------


def test_sender_beats_every_added_instance_until_stopped():
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    address = f"tcp://127.0.0.1:{inbox.bind_to_random_port('tcp://127.0.0.1')}"
    sender = HeartbeatSender(interval_s=0.05)
    try:
        sender.add("E0", address)
        for _ in range(3):
            assert inbox.poll(int(WAIT_S * 1000)), "no heartbeat came"
            assert isinstance(decode_for_instance(inbox.recv()), Heartbeat)
        sender.stop()
        assert not sender.running
        while inbox.poll(0):  # what was sent before stop
            inbox.recv()
        assert not inbox.poll(int(10 * sender.interval_s * 1000)), "beats went on after stop()"
    finally:
        sender.stop()
        ctx.destroy(linger=0)


def test_interval_leaves_several_beats_per_timeout():
    assert heartbeat_interval(30.0) == 1.0
    assert heartbeat_interval(1.5) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        heartbeat_interval(0)


# ---- the instance's rule, on a virtual clock -----------------------------------------------------


def test_instance_judges_silence_only_after_draining_its_inbox(checkpoints):
    ctx = zmq.Context()
    router_inbox = ctx.socket(zmq.PULL)
    router_address = f"tcp://127.0.0.1:{router_inbox.bind_to_random_port('tcp://127.0.0.1')}"
    spec = Layout.parse("1E+1P+1D").instances("cpu")[0]  # E0: the cheapest to build
    cfg = InstanceConfig(
        spec, engine_config(str(checkpoints["qwen2_5_vl"])), router_address, heartbeat_timeout_s=1.5
    )
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(router_address)
    clock = VirtualClock(100.0)
    instance = Instance(cfg, ctx, outbox, clock)
    router = ctx.socket(zmq.PUSH)
    router.connect(instance.control_address)
    try:
        # A step far longer than the timeout, with a beat queued meanwhile: heard, not silent.
        router.send(encode(Heartbeat()))
        assert instance.inbox.poll(int(WAIT_S * 1000), zmq.POLLIN), "the beat did not arrive"
        clock.advance(10.0)
        assert not instance.router_silent()
        assert instance.last_heard == clock.monotonic()
        clock.advance(1.5)
        assert not instance.router_silent()  # exactly the timeout: not yet
        clock.advance(0.01)
        assert instance.router_silent()
    finally:
        instance.close()
        ctx.destroy(linger=0)


# ---- real processes ------------------------------------------------------------------------------

ROUTER_SCRIPT = """
import sys

from epd.cluster.cluster import Cluster
from epd.cluster.layout import Layout
from epd.entrypoints.async_engine import EngineArgs

if __name__ == "__main__":
    engine = EngineArgs(model={model!r}, block_size=4, num_kv_blocks=512).engine_config()
    cluster = Cluster(Layout.parse("1E+1P+1D"), engine, heartbeat_timeout_s={timeout})
    print(" ".join(str(h.ready.pid) for h in cluster.router.instances.values()), flush=True)
    sys.stdin.read()  # idle until killed
"""


def read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    """The child's first line of stdout, waiting at most timeout_s."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, f"no output within {timeout_s} s"
    return proc.stdout.readline()


def test_instances_exit_when_their_router_process_is_killed(tmp_path, checkpoints):
    script = tmp_path / "router.py"
    script.write_text(ROUTER_SCRIPT.format(model=str(checkpoints["qwen2_5_vl"]), timeout=SHORT_TIMEOUT_S))
    stderr = (tmp_path / "stderr").open("w")
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    pids: list[int] = []
    try:
        line = read_line(proc, WAIT_S)
        assert line, (tmp_path / "stderr").read_text()[-3000:]
        pids = [int(p) for p in line.split()]
        assert len(pids) == 3 and all(process_running(p) for p in pids)
        proc.send_signal(signal.SIGKILL)  # no shutdown, no finalizer, no atexit: only silence
        proc.wait(timeout=WAIT_S)
        deadline = time.monotonic() + EXIT_BOUND_S
        while any(process_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in pids if process_running(p)]
        assert not left, f"instances {left} outlived their router by {EXIT_BOUND_S} s"
    finally:
        proc.kill()
        proc.wait()
        stderr.close()
        for pid in pids:  # only if the test failed: the processes this test started
            if process_running(pid):
                os.kill(pid, signal.SIGKILL)


def test_idle_cluster_keeps_its_instances_and_still_serves(checkpoints):
    model = str(checkpoints["qwen2_5_vl"])
    cluster = Cluster(Layout.parse("1EP+1D"), engine_config(model), heartbeat_timeout_s=SHORT_TIMEOUT_S)
    try:
        # Nobody drives the router here: only the heartbeat thread speaks for it.
        idle_until = time.monotonic() + 3 * SHORT_TIMEOUT_S
        while time.monotonic() < idle_until:
            dead = [name for name, launched in cluster.launched.items() if not launched.is_alive()]
            assert not dead, f"{dead} exited while the router was idle but alive"
            time.sleep(0.1)
        prompt = InputProcessor.from_pretrained(model).process_prompt("still there?")
        cluster.add_request("after-idle", prompt, SamplingParams(temperature=0, max_tokens=3))
        finished = []
        deadline = time.monotonic() + WAIT_S
        while not finished and time.monotonic() < deadline:
            finished = [o for o in cluster.step() if o.finished]
        assert finished, f"no answer within {WAIT_S} s"
        [out] = finished
        assert out.error is None and len(out.outputs[0].token_ids) == 3
    finally:
        cluster.shutdown()

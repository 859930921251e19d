"""`Cluster` starts its instances through the `Launcher` it is given, and the router's view of each
instance is that launcher's `is_alive`.

The launcher here is the local one with the changes a real launcher would make: D1 binds another
loopback address (its own host, advertised in its InstanceReady) and, as on another host, does
not see the router's directory of Unix sockets (epd.cluster.local_sockets), so it talks TCP
where the others use those sockets; and every started instance is kept so the test can kill it
through the launcher, as a controller would.
"""

from __future__ import annotations

import time
from dataclasses import replace

from epd.cluster.cluster import Cluster
from epd.cluster.instance import InstanceConfig
from epd.cluster.launcher import LocalProcess, LocalProcessLauncher
from epd.cluster.layout import InstanceSpec, Layout
from epd.entrypoints.async_engine import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.sampling_params import SamplingParams

WAIT_S = 120.0  # an overall bound on each wait for a state, never a guess at how long work takes
OTHER_HOST = "127.0.0.2"  # loopback too (all of 127/8), yet not the cluster's host


class ProbedProcess(LocalProcess):
    """A local instance process that counts how often anyone asked whether it lives."""

    def __init__(self, launched: LocalProcess) -> None:
        super().__init__(launched.name, launched.process)
        self.probes = 0

    def is_alive(self) -> bool:
        self.probes += 1
        return super().is_alive()


class RecordingLauncher(LocalProcessLauncher):
    def __init__(self) -> None:
        super().__init__("127.0.0.1")
        self.configs: dict[str, InstanceConfig] = {}
        self.started: dict[str, ProbedProcess] = {}

    def host_for(self, spec: InstanceSpec) -> str:
        return OTHER_HOST if spec.name == "D1" else super().host_for(spec)

    def start(self, cfg: InstanceConfig) -> ProbedProcess:
        if cfg.host == OTHER_HOST:  # that host's filesystem has no such directory
            cfg = replace(cfg, socket_dir=f"{cfg.socket_dir}-not-on-this-host")
        self.configs[cfg.name] = cfg
        self.started[cfg.name] = ProbedProcess(super().start(cfg))
        return self.started[cfg.name]


def run_until_all_finished(cluster: Cluster, count: int, finished: dict | None = None) -> dict:
    outputs = dict(finished or {})
    deadline = time.monotonic() + WAIT_S
    while len(outputs) < count and time.monotonic() < deadline:
        outputs.update({o.request_id: o for o in cluster.step() if o.finished})
    assert len(outputs) == count, "a request hung"
    return outputs


def test_cluster_runs_on_the_launcher_it_is_given(checkpoints):
    model = str(checkpoints["qwen2_5_vl"])
    launcher = RecordingLauncher()
    engine = EngineArgs(model=model, block_size=4, num_kv_blocks=512, max_model_len=1024).engine_config()
    cluster = Cluster(Layout.parse("1EP+2D"), engine, launcher=launcher)
    try:
        router = cluster.router
        assert sorted(launcher.started) == sorted(router.instances) == ["D0", "D1", "EP0"]
        # Each instance bound where its launcher said, and told the router so.
        assert {n: c.host for n, c in launcher.configs.items()} == {
            "EP0": "127.0.0.1",
            "D0": "127.0.0.1",
            "D1": OTHER_HOST,
        }
        for name, handle in router.instances.items():
            host = launcher.configs[name].host
            control = f"tcp://{host}:" if host == OTHER_HOST else f"ipc://{cluster.sockets.path}/{name}-"
            assert handle.ready.control_address.startswith(control)
            assert handle.ready.data_address.startswith(f"tcp://{host}:")

        processor = InputProcessor.from_pretrained(model)
        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        for i in range(4):
            cluster.add_request(str(i), processor.process_prompt(f"request number {i}"), params)
        on_victim = {rid for rid, r in router.requests.items() if r.decode == "D1"}
        assert on_victim and len(on_victim) < 4
        # D0's requests may end before D1's begin (a loaded machine): keep their outputs.
        finished, deadline = {}, time.monotonic() + WAIT_S
        while not all(len(r.token_ids) > 3 for r in router.requests.values()):
            assert time.monotonic() < deadline, "decoding did not start everywhere"
            finished.update({o.request_id: o for o in cluster.step() if o.finished})

        victim = launcher.started["D1"]
        probes_before = victim.probes
        victim.kill()  # through the launcher, as a controller would
        victim.join(WAIT_S)
        outputs = run_until_all_finished(cluster, 4, finished)
        assert victim.probes > probes_before, "the router did not ask the launcher"
        # It found D1 dead through the launcher: D1's requests went on elsewhere.
        assert cluster.instance_stats()["D1"]["requests_continue_total"] == len(on_victim)
        for out in outputs.values():
            assert out.error is None and len(out.outputs[0].token_ids) == 400
    finally:
        cluster.shutdown()
    assert not any(p.is_alive() for p in launcher.started.values())

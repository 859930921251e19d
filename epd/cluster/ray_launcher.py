"""Instances as Ray actors, on any node of a Ray cluster (`epd serve --launcher ray`).

Each instance is one actor holding its resources (a GPU for a `cuda` device, `cpus_per_instance`
CPUs); its one method runs `instance_main` until the instance stops. The router and the front end
stay in this process. Where an actor lands is Ray's choice (spread over the nodes), unless the
instance's layout group carries `@label`: then only nodes started with
`--labels epd-group=<label>` qualify (`2E@encoders+2P+2D`).

Addresses travel through the control plane, as with local processes: the actor binds on its node's
IP (known only once it runs there) and says so in `InstanceReady`; the router's messages carry each
peer's connector address from there. Nothing is shared through files.

| LaunchedInstance | here                                                                   |
|------------------|------------------------------------------------------------------------|
| is_alive         | its `run` has not returned (a pending actor counts: it is starting)     |
| kill             | `ray.kill`: the actor's process ends, its resources return to the pool |
| join             | waits for `run` to return, then frees the actor                        |
| exitcode         | 0 returned, 1 raised, -9 died or killed, None while it runs            |

Actors are owned by this process: when it exits, Ray ends them too (no detached actors), and
instances exit anyway once the router's heartbeats stop (epd.cluster.heartbeat).
Ray is an optional dependency (`pip install 'epd[ray]'`): it is imported only here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

from epd.cluster.instance import InstanceConfig, instance_main
from epd.cluster.layout import InstanceSpec

logger = logging.getLogger(__name__)

GROUP_LABEL = "epd-group"  # the node label a layout's `@label` selects on


def import_ray() -> Any:
    """The ray module, or ImportError saying how to get it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError("the Ray launcher needs Ray: pip install 'epd[ray]'") from exc
    return ray


# Ray would hide every GPU but the assigned one from the actor; CUDA IPC and NCCL's direct paths
# between two actors of one host need to see the peer's GPU too (as vLLM does under Ray).
_SEE_ALL_GPUS = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}


def run_instance(cfg: InstanceConfig) -> None:
    """In the actor, on its node: bind where this node is reachable and on the GPU Ray gave it."""
    ray = import_ray()
    device = cfg.engine.device
    if str(device).startswith("cuda"):
        device = f"cuda:{local_gpu_index(ray.get_gpu_ids()[0], os.environ.get('CUDA_VISIBLE_DEVICES'))}"
    host = ray.util.get_node_ip_address()
    instance_main(replace(cfg, host=host, engine=replace(cfg.engine, device=device)))


def local_gpu_index(ray_gpu_id: int | str, visible: str | None) -> int:
    """The torch index of the GPU Ray assigned: its position among the node's visible GPUs, as
    Ray's GPU ids count within what the node was started with (CUDA_VISIBLE_DEVICES, if set)."""
    if not visible:
        return int(ray_gpu_id)
    return [v.strip() for v in visible.split(",")].index(str(ray_gpu_id))


class _InstanceActor:
    """Made a Ray actor class by `RayLauncher` (ray.remote needs ray imported)."""

    def run(self, cfg: InstanceConfig) -> None:
        run_instance(cfg)


class RayInstance:
    """One instance running in a Ray actor (the LaunchedInstance protocol; see the table above)."""

    def __init__(self, name: str, actor: Any, run_ref: Any) -> None:
        self._name, self._actor, self._run = name, actor, run_ref
        self._exitcode: int | None = None

    @property
    def name(self) -> str:
        return self._name

    def is_alive(self) -> bool:
        if self._exitcode is None and self._finished(0):
            self._settle()
        return self._exitcode is None

    def kill(self) -> None:
        import_ray().kill(self._actor, no_restart=True)
        if self._exitcode is None:
            self._exitcode = -9

    def join(self, timeout_s: float | None = None) -> None:
        if self._exitcode is None and self._finished(timeout_s):
            self._settle()

    @property
    def exitcode(self) -> int | None:
        return self._exitcode

    def _finished(self, timeout_s: float | None) -> bool:
        ready, _ = import_ray().wait([self._run], timeout=timeout_s)
        return bool(ready)

    def _settle(self) -> None:
        ray = import_ray()
        try:
            ray.get(self._run)
            self._exitcode = 0
        except ray.exceptions.RayActorError:
            self._exitcode = -9
        except Exception:  # what instance_main raised (its InstanceFailed report says more)
            self._exitcode = 1
        ray.kill(self._actor, no_restart=True)  # run returned; the idle actor would hold its resources


class RayLauncher:
    """Starts each instance as an actor on the Ray cluster at `address` (None: Ray's default: the
    cluster this process already joined, RAY_ADDRESS, or one started by `ray start` here)."""

    multi_host = True  # `transfer="auto"` is then chosen per pair (epd.transfer.auto)

    def __init__(self, address: str | None = None, cpus_per_instance: float = 1.0) -> None:
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=address, logging_level=logging.WARNING)
        self.cpus_per_instance = cpus_per_instance
        # The router binds here: this node's address, which the other nodes reach.
        self.host = ray.util.get_node_ip_address()
        self._actor_class = ray.remote(max_restarts=0)(_InstanceActor)

    def host_for(self, spec: InstanceSpec) -> str:
        # Provisional: the actor binds on its own node's address once Ray has placed it.
        return self.host

    def start(self, cfg: InstanceConfig) -> RayInstance:
        actor = self._actor_class.options(**self.actor_options(cfg.spec)).remote()
        return RayInstance(cfg.name, actor, actor.run.remote(cfg))

    def actor_options(self, spec: InstanceSpec) -> dict[str, Any]:
        """What the actor of `spec` asks Ray for: resources, and where it may run."""
        options: dict[str, Any] = {
            "num_cpus": self.cpus_per_instance,
            "num_gpus": 1 if str(spec.device).startswith("cuda") else 0,
        }
        if options["num_gpus"]:
            options["runtime_env"] = _SEE_ALL_GPUS
        if spec.node_label:
            options["label_selector"] = {GROUP_LABEL: spec.node_label}
        else:
            options["scheduling_strategy"] = "SPREAD"
        return options

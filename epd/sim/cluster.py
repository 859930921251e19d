"""A layout's instances and router, built from real cores, wired to in-memory queues.

| part         | what runs                                   | shell here                                  |
|--------------|---------------------------------------------|---------------------------------------------|
| router       | `RouterCore` on the harness's virtual clock | the harness delivers its `Outgoing`         |
| instance     | `InstanceCore` with scripted (or cost-model)| `SimInstance` (epd.sim.node): own clock,    |
|              | compute: no weights are loaded              | inbox, stamped outbox                       |
| encode-ahead | the engine's `EncodeAhead`, where the config| its tower on the second lane of the         |
|              | encodes ahead (epd.sim.command: as served)  | instance's clock (epd.sim.gpu_share)        |
| connectors   | `MemoryConnector`s of one `MemoryNetwork`   | the harness lands transfers when due        |
| role switches| `RoleSwitches` (by hand: `switches.request`)| the harness feeds it replies and ticks it;  |
|              | and, with `role_switching`, the automatic   | the policy looks every `SWITCH_TICK_S` of   |
|              | policy (epd.cluster.router.auto_driver)     | virtual time while requests are in flight   |

Compute per instance: by default, or given as a function of the costs (`cost_model_compute`), each
instance's is priced by the costs of its tensor-parallel degree (`@tpN`: epd.sim.costs
`costs_at_degree`); a `Compute` given as such serves every instance alike.

The checkpoint directory is still read for its config, tokenizer and image processor files.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from epd.clock import VirtualClock
from epd.cluster.instance import InstanceConfig, InstanceCore
from epd.cluster.instance.core import Compute
from epd.cluster.layout import InstanceSpec, Layout
from epd.cluster.router import InstanceHandle, RouterCore
from epd.cluster.router.auto_driver import AutoRoleSwitching
from epd.cluster.router.auto_roles import RoleSwitchingOptions
from epd.cluster.router.placement import placement_for
from epd.cluster.router.role_switch import RoleSwitches
from epd.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from epd.engine.scripted_runner import ComputeCosts, scripted_parts, scripted_vision
from epd.engine.step_estimator import prefill_seconds_of
from epd.sim.costs import LinearCosts, costs_at_degree
from epd.sim.gpu_share import DEFAULT_OVERLAP_SPEED, SharedGpuClock
from epd.sim.host_costs import HostCosts
from epd.sim.node import SimInstance, StampedOutbox
from epd.sim.tower_lane import with_tower_lane
from epd.transfer.memory import MemoryNetwork, WireBytes, tensor_bytes

ROUTER = "router"
KV_BLOCKS = 2048  # per engine: room for the workload's running requests, no preemption by default
ComputeFor = Callable[[ComputeCosts], Compute]  # compute priced by the costs given


@dataclass(frozen=True)
class ClusterSpec:
    layout: str
    engine: EngineConfig
    costs: ComputeCosts = field(default_factory=LinearCosts)
    control_latency_s: float = 0.0  # router <-> instance, each way
    transfer_latency_s: float = 0.0
    transfer_bandwidth: float = math.inf  # bytes per second, per (sender, receiver) pair
    wire_bytes: WireBytes = tensor_bytes  # what a transfer is charged (epd.sim.wire: a real model's)
    mm_cache_bytes: int = 16 << 20  # per E and P instance
    max_encode_batch_patches: int = 49152
    kv_streaming: str = "request"
    # Automatic role switching (epd.cluster.router.auto_roles); None: the layout stays as it is.
    role_switching: RoleSwitchingOptions | None = None
    host_costs: HostCosts | None = None  # the CPU's work around the model (None: free)
    # The speed of steps and a tower encoding ahead while both run (epd.sim.gpu_share).
    overlap_speed: float = DEFAULT_OVERLAP_SPEED


def engine_config(
    model: str, *, block_size: int = 16, num_kv_blocks: int = KV_BLOCKS, max_num_seqs: int = 128
) -> EngineConfig:
    """An engine of `num_kv_blocks` KV blocks for the checkpoint directory `model`."""
    return EngineConfig(
        ModelConfig(model),
        CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks),
        SchedulerConfig(max_num_seqs=max_num_seqs),
    )


def scripted_compute(costs: ComputeCosts | None = None) -> Compute:
    """Scripted tokens and embeddings (epd.engine.scripted_runner), each forward and vision batch
    taking the time `costs` gives it on its instance's clock."""
    return Compute(partial(scripted_parts, costs=costs), partial(scripted_vision, costs=costs))


class SimCluster:
    """The router and one `SimInstance` per instance of the layout, in layout order."""

    def __init__(self, spec: ClusterSpec, compute: Compute | ComputeFor | None = None) -> None:
        """`compute`: one `Compute` for every instance, or a function of the costs (each instance
        then priced at its degree); None: `scripted_compute` at each instance's degree."""
        self.spec = spec
        self.clock = VirtualClock()  # the router's, and the harness's "now"
        self.network = MemoryNetwork(spec.transfer_latency_s, spec.transfer_bandwidth, spec.wire_bytes)
        self.compute = compute or scripted_compute
        self.nodes = [self._node(s, self._compute_of(s)) for s in Layout.parse(spec.layout).instances("cpu")]
        self.by_name = {node.name: node for node in self.nodes}
        self.by_address = {node.connector.address: node for node in self.nodes}
        # Prefills placed as the prefill stage's queue policy asks (placement_for: slo places by slack).
        placement = placement_for(spec.engine.scheduler.policies.prefill)
        self.router = RouterCore([self._handle(node) for node in self.nodes], self.clock, placement)
        prefill_seconds = prefill_seconds_of(spec.engine.scheduler.slo_profile)
        if prefill_seconds is not None:  # as epd.cluster.cluster: the router prices prompts by it
            self.router.prefill_seconds = prefill_seconds
        self.switches = RoleSwitches(self.router)
        self.auto = self._auto_switching()

    def _auto_switching(self) -> AutoRoleSwitching | None:
        """Inline, not on a thread: virtual time, not the machine's speed, decides when it acts."""
        if self.spec.role_switching is None:
            return None
        from epd.cluster.router.auto_roles_sim import simulated_policy  # it builds SimClusters

        policy = simulated_policy(self.spec.role_switching, self.spec)
        return AutoRoleSwitching(self.router, self.switches, policy, background=False)

    def _compute_of(self, instance: InstanceSpec) -> Compute:
        if isinstance(self.compute, Compute):
            return self.compute  # the caller's, for every instance
        return self.compute(costs_at_degree(self.spec.costs, instance.degree))

    def _node(self, instance: InstanceSpec, compute: Compute) -> SimInstance:
        spec = self.spec
        cfg = InstanceConfig(
            instance,
            spec.engine,
            f"sim://{ROUTER}",
            transfer="memory",
            mm_cache_bytes=spec.mm_cache_bytes,
            max_encode_batch_patches=spec.max_encode_batch_patches,
            kv_streaming=spec.kv_streaming,
        )
        clock = SharedGpuClock(spec.overlap_speed)
        connector = self.network.connector(instance.name, clock)
        outbox = StampedOutbox(clock)
        compute = dataclasses.replace(compute, parts=with_tower_lane(compute.parts))
        return SimInstance(InstanceCore(cfg, connector, outbox, clock, compute), clock, connector, outbox)

    def _handle(self, node: SimInstance) -> InstanceHandle:
        ready = node.core.ready_message(f"sim://{node.name}")
        return InstanceHandle(node.core.cfg.spec, ready, lambda: True)

    def leftovers(self) -> list[str]:
        """What is still held anywhere once a run is over; [] when everything was cleaned up."""
        found = []
        if self.router.requests:
            found.append(f"router: {len(self.router.requests)} requests unfinished")
        if not self.router.ledger.is_empty():
            found.append(f"router: ledger holds {len(self.router.ledger.outstanding())} reservations")
        if self.network.in_flight():
            found.append(f"network: {self.network.in_flight()} transfers in flight")
        for node in self.nodes:
            found += [f"{node.name}: {what}" for what in _held_by(node)]
        return found


def _held_by(node: SimInstance) -> list[str]:
    core, held = node.core, []
    if node.inbox or node.connector.has_received():
        held.append("unread inputs")
    if core.has_work():
        held.append("has work")
    held += [f"{type(s).__name__} holds {s.busy_requests()}" for s in core.stages() if s.busy_requests()]
    if core.engine is not None and (core.engine.requests or core.engine.block_manager.usage > 0):
        held.append(f"engine holds {len(core.engine.requests)} requests")
    caches = [core.mm_cache, core.encode.worker.cache if core.encode is not None else None]
    for cache in (c for c in caches if c is not None):
        if cache.used_blocks != cache.evictable_blocks:
            held.append("MM cache holds pinned or pending embeddings")
    return held

"""The router shell: a `RouterCore` wired to a `ControlPlane`. What `Cluster` and the entrypoints drive.

The core decides and returns messages; the shell sends them and feeds the core what arrives, so
the same core runs behind ZMQ in production and behind in-memory queues in tests and the simulator.
Role switches (role_switch.py) sit next to the core the same way: fed the replies, ticked each poll;
and so does the automatic policy (`auto_policy`: auto_driver.py), which sees every request arrive and
may start a switch on any poll.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from epd.clock import WALL_CLOCK, Clock
from epd.cluster.messages import InstanceReady, SetRolesReply, ToInstance
from epd.cluster.router.auto_driver import AutoRoleSwitching
from epd.cluster.router.auto_roles import AutoRoles
from epd.cluster.router.control_plane import ControlPlane
from epd.cluster.router.core import InstanceHandle, Outgoing, RouterCore
from epd.cluster.router.ledger import LoadLedger
from epd.cluster.router.lifecycle import RequestRecord
from epd.cluster.router.placement import Placement
from epd.cluster.router.role_switch import RoleSwitch, RoleSwitches
from epd.inputs.types import ProcessedPrompt
from epd.outputs import RequestOutput
from epd.sampling_params import SamplingParams


class Router:
    def __init__(
        self,
        instances: list[InstanceHandle],
        control: ControlPlane,
        clock: Clock = WALL_CLOCK,
        placement: Placement | None = None,
        silence_timeout_s: float | None = None,
        auto_policy: AutoRoles | None = None,
    ) -> None:
        self.core = RouterCore(instances, clock, placement, silence_timeout_s)
        self.switches = RoleSwitches(self.core)
        self.control = control
        self.auto = None if auto_policy is None else AutoRoleSwitching(self.core, self.switches, auto_policy)

    # ---- requests in ----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        self._deliver(self.core.add_request(request_id, prompt, params, arrival_time))
        if self.auto is not None:
            self.auto.note_request(prompt, params)

    def abort(self, request_id: str) -> None:
        self._deliver(self.core.abort(request_id))

    def set_roles(
        self, instance: str, roles: str, on_done: Callable[[dict], None] | None = None
    ) -> RoleSwitch:
        """Start switching `instance` to `roles` (role_switch.py); SwitchError if it cannot start."""
        switch, outgoing = self.switches.request(instance, roles, on_done)
        self._deliver(outgoing)
        return switch

    # ---- messages in ----------------------------------------------------------------------------

    def poll(self, timeout_ms: int = 100) -> list[RequestOutput]:
        """Handle what arrived (waiting up to timeout_ms for the first message); the outputs
        (cumulative, as in RequestOutput) of every request that advanced or finished."""
        for message in self.control.receive(timeout_ms / 1000):
            if isinstance(message, InstanceReady):  # a restarted instance, at its new address
                self.control.connect(message.instance, message.control_address, message.reads_shared_files)
            self._deliver(self.core.handle(message))
            if isinstance(message, SetRolesReply):
                self.switches.on_reply(message)
        self._deliver(self.core.tick())
        self._deliver(self.switches.tick())
        if self.auto is not None:
            self._deliver(self.auto.tick())
        return self.core.take_outputs()

    def wake(self) -> None:
        """From any thread: a `poll` waiting now returns at once (new work for the core)."""
        self.control.wake()

    def broadcast(self, message: ToInstance) -> None:
        """Send `message` to every instance still alive (Shutdown, at the end)."""
        for handle in self.instances.values():
            if handle.alive:
                self.control.send(handle.name, message)

    def close(self) -> None:
        """Stop the automatic policy's thread (the control plane is closed by its owner)."""
        if self.auto is not None:
            self.auto.close()

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def _deliver(self, outgoing: Iterable[Outgoing]) -> None:
        for instance, message in outgoing:
            self.control.send(instance, message)

    # ---- what the core knows, read by the cluster, the entrypoints and tests --------------------

    @property
    def instances(self) -> dict[str, InstanceHandle]:
        return self.core.instances

    @property
    def requests(self) -> dict[str, RequestRecord]:
        return self.core.requests

    @property
    def instance_stats(self) -> dict[str, dict[str, float]]:
        return self.core.instance_stats

    @property
    def stats(self) -> dict[str, int]:
        return self.core.stats

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def ledger(self) -> LoadLedger:
        return self.core.ledger

    @property
    def clock(self) -> Clock:
        return self.core.clock

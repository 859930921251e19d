"""What the entry points drive: one protocol for the in-process engine and a cluster of instances.

| backend        | what runs                         | instances         | where                        |
|----------------|-----------------------------------|-------------------|------------------------------|
| `LLMEngine`    | one aggregated engine (`1EPD`)    | "EPD0", always up | this process                 |
| `Cluster`      | the router and instance processes | one per layout    | epd.cluster: any other layout|
|                |                                   | group member      |                              |

`LLM` and `AsyncEngine` use only these methods, so a new backend (a Ray launcher, the
simulator's virtual cluster) plugs in without an `isinstance` in the entry points.

Role control (`RoleControl`: list the instances, switch one's roles) is a second protocol: a
`Cluster` offers it; `role_control` wraps a backend that does not (the in-process engine) in
`FixedRoles`, one instance that holds every role and refuses to change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from epd.inputs.types import ProcessedPrompt
from epd.outputs import RequestOutput
from epd.sampling_params import SamplingParams


@runtime_checkable
class EngineBackend(Protocol):
    @property
    def max_model_len(self) -> int:
        """Longest prompt + output any request may have."""
        ...

    def prepare_images(self, prompt: ProcessedPrompt) -> ProcessedPrompt:
        """What `add_request` wants of the prompt's images, made on the caller's thread (which
        may block): the patches for an engine that encodes in this process; nothing for a
        cluster (its encoding instances decode the files)."""
        ...

    def add_request(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> object:
        """Queue a request. ValueError: it can never run (too long, ...); RuntimeError: no
        instance can take it now. Either concerns this request only."""
        ...

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free what it holds; unknown or finished ids are ignored."""
        ...

    def step(self) -> list[RequestOutput]:
        """Advance the work; the outputs of the requests that advanced."""
        ...

    def has_unfinished_requests(self) -> bool: ...

    def wake(self) -> None:
        """From any thread: a `step` waiting for work from elsewhere returns now (a submission)."""
        ...

    def poll_idle(self) -> list[RequestOutput]:
        """Housekeeping while no request runs (instance stats, liveness), without waiting."""
        ...

    def instance_stats(self) -> dict[str, dict[str, float]]:
        """Latest figures per instance name (epd.cluster.stats.STAT_HELP)."""
        ...

    def instances_up(self) -> dict[str, bool]: ...

    def missing_roles(self) -> list[str]:
        """Roles ("E", "P", "D") the layout has that no live instance holds now: [] while it can
        serve every request, whichever instances are down."""
        ...

    def shutdown(self) -> None:
        """Stop every process the backend started. Idempotent."""
        ...


@runtime_checkable
class RoleControl(Protocol):
    def instances(self) -> list[dict]:
        """Every instance as {"id", "roles" (letters, "PD"), "device", "state" (up, draining,
        switching, down)}."""
        ...

    def set_roles(self, instance: str, roles: str, on_done: Callable[[dict], None]) -> None:
        """Start switching `instance` to `roles` ("P"); `on_done` hears the switch's record
        (epd.cluster.router.role_switch.RoleSwitch.to_dict) once it rejoined or failed. Raises a
        SwitchError (same module) when it cannot start. Called from the thread that steps."""
        ...

    def role_switches(self) -> list[dict]:
        """Every finished switch's record, oldest first."""
        ...


class FixedRoles:
    """The role control of a backend that cannot switch: one instance in this process, every role."""

    def __init__(self, backend: EngineBackend) -> None:
        self.backend = backend

    def _name(self) -> str:
        return next(iter(self.backend.instances_up()))

    def instances(self) -> list[dict]:
        device = str(getattr(self.backend, "device", "cpu"))
        up = self.backend.instances_up()[self._name()]
        return [{"id": self._name(), "roles": "EPD", "device": device, "state": "up" if up else "down"}]

    def set_roles(self, instance: str, roles: str, on_done: Callable[[dict], None]) -> None:
        from epd.cluster.instance.roles import Loaded, parse_roles, refusal
        from epd.cluster.layout import Role
        from epd.cluster.router.role_switch import (
            BadRoles,
            RoleSwitch,
            SwitchRefused,
            SwitchState,
            UnknownInstance,
        )

        name = self._name()
        if instance != name:
            raise UnknownInstance(f"no instance {instance!r} (instances: {name})")
        try:
            wanted = parse_roles(roles)
        except ValueError as err:
            raise BadRoles(str(err)) from None
        every = frozenset(Role)
        why = refusal(name, every, wanted, Loaded(True, True, True), {})
        if why is not None:
            raise (BadRoles if not wanted else SwitchRefused)(why)
        on_done(RoleSwitch(name, "EPD", "EPD", 0.0, SwitchState.DONE, 0.0, 0.0, 0.0).to_dict())  # no change

    def role_switches(self) -> list[dict]:
        return []


def role_control(backend: EngineBackend) -> RoleControl:
    return backend if isinstance(backend, RoleControl) else FixedRoles(backend)

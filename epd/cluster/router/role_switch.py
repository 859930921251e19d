"""Moving an instance between P and D while serving: drain, reconfigure, rejoin, each timed.

    request(name, "D") -- checks (below) --> DRAINING: placement skips the instance
    DRAINING      -- the ledger holds nothing on it --> SetRoles sent ----------> RECONFIGURING
    RECONFIGURING -- SetRolesReply with the new roles: back in placement -----> DONE
    RECONFIGURING -- refused, still finishing (a KV send not yet confirmed) --> DRAINING (retry)
    any           -- died, refused for good, drain timeout: old roles kept ----> FAILED

| phase       | from                                      | to                                         |
|-------------|-------------------------------------------|--------------------------------------------|
| drain       | the request                               | the SetRoles that the instance accepted    |
|             |                                           | goes out (retries after "still holds" too) |
| reconfigure | that SetRoles goes out                    | its reply arrives: the instance rebuilt its|
|             |                                           | P and D stages around the same engine and  |
|             |                                           | KV cache (plus one control hop each way)   |
| rejoin      | the reply arrives                         | the router's view follows (roles, held     |
|             |                                           | embeddings) and placement takes it again   |

Why the whole instance leaves placement, not only the role it loses: its P and D stages share one
engine, whose wiring (hand the KV off, or decode here) changes only while it is idle
(epd.cluster.instance.roles). The roles it keeps are placed again at rejoin.

Checked before anything changes (`SwitchError`s, nothing sent): the instance exists and lives; the
letters name roles; no other switch of it is under way; the switch moves only P and D (E comes with
its weights: refused with the instance's own rule, roles.refusal); and while it drains some other
live instance, not itself switching, still takes P and one takes D, so no request finds no place.

A pure state machine like the router core: it returns the messages to send (`Outgoing`); the shell
(shell.Router) delivers them, feeds it the replies and calls `tick`.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from epd.cluster.instance.roles import Loaded, only_busy, parse_roles, refusal
from epd.cluster.layout import Role, role_letters
from epd.cluster.messages import SetRoles, SetRolesReply
from epd.cluster.router.core import InstanceHandle, Outgoing, RouterCore

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 600.0  # a switch whose instance still holds work after this gives up
RETRY_S = 0.005  # after a "still holds" refusal: what is left is a confirmation on its way
PHASES = ("drain", "reconfigure", "rejoin", "total")


class SwitchError(Exception):
    """A switch that cannot start; nothing changed."""


class UnknownInstance(SwitchError, LookupError):
    pass


class BadRoles(SwitchError, ValueError):
    pass


class SwitchRefused(SwitchError):
    pass


class SwitchInProgress(SwitchRefused):
    pass


class SwitchState(enum.Enum):
    DRAINING = "draining"
    RECONFIGURING = "switching"  # what GET /admin/instances shows
    DONE = "done"
    FAILED = "failed"


@dataclass
class RoleSwitch:
    """One switch of one instance; times are the router clock's monotonic seconds."""

    instance: str
    before: str  # role letters ("PD")
    after: str
    requested: float
    state: SwitchState = SwitchState.DRAINING
    sent: float | None = None  # the last SetRoles out
    replied: float | None = None
    rejoined: float | None = None
    error: str | None = None
    attempts: int = 0  # SetRoles sent (more than one: refusals while it finished its last work)
    retry_at: float = 0.0
    listeners: list[Callable[[dict], None]] = field(default_factory=list, repr=False)

    def timings(self) -> dict[str, float | None]:
        """Seconds per phase (None: not reached); they add up to `total`."""
        end = self.rejoined
        return {
            "drain": _span(self.requested, self.sent if self.replied is not None else None),
            "reconfigure": _span(self.sent, self.replied),
            "rejoin": _span(self.replied, self.rejoined),
            "total": _span(self.requested, end if end is not None else None),
        }

    def to_dict(self) -> dict:
        return {
            "id": self.instance,
            "from": self.before,
            "to": self.after,
            "state": self.state.value,
            "error": self.error,
            "attempts": self.attempts,
            "timings": self.timings(),
        }


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


class RoleSwitches:
    """The switches under way (at most one per instance) and the history of finished ones."""

    def __init__(self, core: RouterCore, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        self.core, self.drain_timeout_s = core, drain_timeout_s
        self.active: dict[str, RoleSwitch] = {}
        self.history: list[RoleSwitch] = []  # finished, in order: what metrics count
        self._ready: dict[str, object] = {}  # the InstanceReady each switch began with (a restart ends it)

    # ---- the interface ------------------------------------------------------------------------

    def request(
        self, name: str, letters: str, on_done: Callable[[dict], None] | None = None
    ) -> tuple[RoleSwitch, list[Outgoing]]:
        """Start switching `name` to the roles `letters` names; SwitchError if it cannot start.
        `on_done` hears the switch's `to_dict()` once it is done or failed. The same roles again
        is a switch done at once (nothing drains)."""
        handle = self._check(name, letters)
        before, after = role_letters(handle.spec.roles), role_letters(parse_roles(letters))
        now = self.core.clock.monotonic()
        switch = RoleSwitch(name, before, after, now, listeners=[on_done] if on_done else [])
        if before == after:
            switch.state, switch.sent = SwitchState.DONE, now
            switch.replied = switch.rejoined = now
            self._notify(switch)
            return switch, []
        self.active[name] = switch
        self._ready[name] = handle.ready
        self.core.draining.add(name)
        logger.info("%s: switching %s -> %s: draining", name, before, after)
        return switch, self.tick()

    def on_reply(self, msg: SetRolesReply) -> None:
        """The instance's answer (the router core has taken its roles already)."""
        switch = self.active.get(msg.instance)
        if switch is None or switch.state is not SwitchState.RECONFIGURING or not self._same_life(switch):
            return
        now = self.core.clock.monotonic()
        if msg.error is None and msg.roles == switch.after:
            switch.replied = now
            self._end(switch, SwitchState.DONE)
        elif only_busy(msg.error):
            switch.state, switch.retry_at = SwitchState.DRAINING, now + RETRY_S
        else:
            self._end(switch, SwitchState.FAILED, msg.error or f"it reported roles {msg.roles}")

    def tick(self) -> list[Outgoing]:
        """Send SetRoles where the drain is over; end switches whose instance died or timed out."""
        outgoing = []
        now = self.core.clock.monotonic()
        for switch in list(self.active.values()):
            if not self._same_life(switch):
                self._end(switch, SwitchState.FAILED, "the instance died during the switch")
            elif switch.state is not SwitchState.DRAINING:
                continue
            elif self.core.ledger.load(switch.instance) == 0 and now >= switch.retry_at:
                switch.state, switch.sent = SwitchState.RECONFIGURING, now
                switch.attempts += 1
                outgoing.append(Outgoing(switch.instance, SetRoles(switch.after)))
            elif now - switch.requested > self.drain_timeout_s:
                held = f"it still held work after {self.drain_timeout_s:g} s of draining"
                self._end(switch, SwitchState.FAILED, held)
        return outgoing

    def busy(self) -> bool:
        return bool(self.active)

    def state_of(self, name: str) -> str:
        """up, down, draining or switching (SetRoles out, no reply yet)."""
        handle = self.core.instances[name]
        if not handle.alive:
            return "down"
        switch = self.active.get(name)
        return "up" if switch is None else switch.state.value

    def instances(self) -> list[dict]:
        """Every instance as {"id", "roles", "device", "state"}, in layout order."""
        return [
            {
                "id": name,
                "roles": role_letters(h.spec.roles),
                "device": h.spec.device,
                "state": self.state_of(name),
            }
            for name, h in list(self.core.instances.items())
        ]

    def records(self) -> list[dict]:
        """Every finished switch (`RoleSwitch.to_dict`), oldest first."""
        return [s.to_dict() for s in list(self.history)]

    # ---- inside -------------------------------------------------------------------------------

    def _check(self, name: str, letters: str) -> InstanceHandle:
        handle = self.core.instances.get(name)
        if handle is None:
            known = ", ".join(self.core.instances)
            raise UnknownInstance(f"no instance {name!r} (instances: {known})")
        try:
            wanted = parse_roles(letters)
        except ValueError as err:
            raise BadRoles(str(err)) from None
        current = handle.spec.roles
        change = (
            f"{name} cannot switch from {role_letters(current)} to {role_letters(wanted) or repr(letters)}"
        )
        if not wanted:
            raise BadRoles(f"{change}: an instance needs at least one role")
        if name in self.active:
            under_way = self.active[name]
            raise SwitchInProgress(
                f"{name} is already switching from {under_way.before} to {under_way.after} "
                f"({under_way.state.value}); wait for it to finish"
            )
        if not handle.alive:
            raise SwitchRefused(f"{change}: it is down")
        if wanted == current:
            return handle
        if Role.ENCODE in current | wanted:
            raise SwitchRefused(self._encode_refusal(handle, wanted, change))
        self._check_others_serve(handle, change)
        return handle

    @staticmethod
    def _encode_refusal(handle: InstanceHandle, wanted: frozenset[Role], change: str) -> str:
        """E moves with its weights (out of this mechanism): the instance's own rule, else why not."""
        ready = handle.ready
        loaded = Loaded(ready.language_parameters > 0, ready.vision_parameters > 0, False)
        rule = refusal(handle.name, handle.spec.roles, wanted, loaded, {})
        return rule or f"{change}: only P and D move between running instances; E stays where it started"

    def _check_others_serve(self, handle: InstanceHandle, change: str) -> None:
        """While it drains, placement skips it: some other instance must take P, and one D."""
        for role in (Role.PREFILL, Role.DECODE):
            others = [
                h.name
                for h in self.core.instances.values()
                if h.alive and h.name != handle.name and h.name not in self.core.draining and h.has(role)
            ]
            if not others:
                raise SwitchRefused(
                    f"{change}: no other live instance takes {role.value} while it drains; "
                    f"switch another instance to {role.value} first"
                )

    def _same_life(self, switch: RoleSwitch) -> bool:
        handle = self.core.instances[switch.instance]
        return handle.alive and handle.ready is self._ready.get(switch.instance)

    def _end(self, switch: RoleSwitch, state: SwitchState, error: str | None = None) -> None:
        switch.state, switch.error = state, error
        self.core.draining.discard(switch.instance)  # placed again: new roles, or the old ones
        switch.rejoined = self.core.clock.monotonic()
        del self.active[switch.instance]
        self._ready.pop(switch.instance, None)
        self.history.append(switch)
        if error is None:
            t = switch.timings()
            logger.info(
                "%s: %s -> %s in %.4f s (drain %.4f, reconfigure %.4f, rejoin %.6f)",
                *(switch.instance, switch.before, switch.after),
                *(t["total"], t["drain"], t["reconfigure"], t["rejoin"]),
            )
        else:
            logger.warning(
                "%s: switch %s -> %s failed: %s", switch.instance, switch.before, switch.after, error
            )
        self._notify(switch)

    @staticmethod
    def _notify(switch: RoleSwitch) -> None:
        result = switch.to_dict()
        for listener in switch.listeners:
            try:
                listener(result)
            except Exception:  # one listener's bug must not stop the router
                logger.exception("a listener of %s's switch failed", switch.instance)

"""Moving an instance between roles while serving: drain, reconfigure, rejoin, each timed.

    request(name, "D") -- checks (below) --> DRAINING: placement skips the instance; its running
                                             decodes migrate to other D instances (below)
    DRAINING      -- the ledger holds nothing on it --> SetRoles sent ----------> RECONFIGURING
    RECONFIGURING -- SetRolesReply with the new roles: back in placement -----> DONE
    RECONFIGURING -- refused, still finishing (a KV send not yet confirmed) --> DRAINING (retry)
    any           -- died, refused for good, drain timeout: old roles kept ----> FAILED

| phase       | from                                      | to                                         |
|-------------|-------------------------------------------|--------------------------------------------|
| drain       | the request                               | the SetRoles that the instance accepted    |
|             |                                           | goes out (retries after "still holds" too) |
| reconfigure | that SetRoles goes out                    | its reply arrives: the instance rebuilt    |
|             |                                           | what its new roles need (plus one control  |
|             |                                           | hop each way); of which, as it reports:    |
|   weights   |                                           | copying a part's weights from host memory  |
|             |                                           | to the device (E <-> P/D; 0 for P <-> D)   |
|   memory    |                                           | freeing the old parts, making the caches   |
|             |                                           | (MM cache, KV cache) and stages of the new |
| rejoin      | the reply arrives                         | the router's view follows (roles, held     |
|             |                                           | embeddings) and placement takes it again   |

Why the whole instance leaves placement, not only the role it loses: its stages share one engine,
whose wiring (hand the KV off, or decode here) changes only while it is idle, and a switch that
adds or drops E rebuilds it (epd.cluster.instance.core). The roles it keeps are placed again at
rejoin. E moves only on an instance started with `switchable_roles` (both parts of the model in
host memory): elsewhere the instance's own rule refuses it (roles.refusal).

A draining instance does not wait for its decodes to end (a long generation would hold the switch
for as long): each request that decodes there and whose KV is there (it sent a token) is moved to
the least-loaded other D. The router sends `MigrateRequest`; the instance sends the request's KV
through its connector, as a prefill hands off, and the new D goes on from its token count, so the
client's stream has no gap and no repeat. The ledger holds the move on both ends until the new D
reports a token, so the drain ends only once every moved request runs on its new D, and either
instance's death is a death with the request's work (recovery.py continues it elsewhere):

| ledger item                          | on               | released when                         |
|--------------------------------------|------------------|---------------------------------------|
| the decode (`Work(rid, D)`)          | the new D        | the request ends                      |
| the move's source (`Work(rid, D, 1)`)| the draining one | the new D's first token, or the end   |

An instance that cannot send a request's KV (it waits there to be recomputed) refuses
(`MigrationRefused`): the move is undone and the request finishes where it is.

Checked before anything changes (`SwitchError`s, nothing sent): the instance exists and lives; the
letters name roles; no other switch of it is under way; E moves only where the instance allows it;
and while it drains some other live instance, not itself switching, still takes P and one takes D
(and, for an encoder, one still encodes), so no request finds no place.

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
from epd.cluster.messages import MigrateRequest, MigrationRefused, SetRoles, SetRolesReply
from epd.cluster.router.core import MIGRATION_SOURCE, InstanceHandle, Outgoing, RouterCore
from epd.cluster.router.ledger import Work
from epd.cluster.router.lifecycle import RequestRecord
from epd.cluster.router.placement import least_loaded

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 600.0  # a switch whose instance still holds work after this gives up
RETRY_S = 0.005  # after a "still holds" refusal: what is left is a confirmation on its way
PHASES = ("drain", "reconfigure", "weights", "memory", "rejoin", "total")
INSIDE = ("weights", "memory")  # parts of reconfigure the instance times itself


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
    instance_timings: dict[str, float] = field(default_factory=dict)  # "weights", "memory"
    migrated: int = 0  # running requests moved to other decode instances while it drained
    unmovable: set[str] = field(default_factory=set, repr=False)  # refused a move: they end here
    trigger: str = "admin"  # who asked: "admin" (the API, by hand) or "auto" (auto_roles.py)
    reason: str | None = None  # an automatic switch's: the stage it relieves (encode, prefill, decode)
    listeners: list[Callable[[dict], None]] = field(default_factory=list, repr=False)

    def timings(self) -> dict[str, float | None]:
        """Seconds per phase (None: not reached); they add up to `total`."""
        end = self.rejoined
        reconfigure = _span(self.sent, self.replied)
        # Within reconfigure, as the instance measured them (None until it replied).
        inside = {k: None if reconfigure is None else self.instance_timings.get(k, 0.0) for k in INSIDE}
        return {
            "drain": _span(self.requested, self.sent if self.replied is not None else None),
            "reconfigure": reconfigure,
            "weights": inside["weights"],
            "memory": inside["memory"],
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
            "migrated": self.migrated,
            "timings": self.timings(),
            "trigger": self.trigger,
            "reason": self.reason,
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
        core.on(MigrationRefused, self._migration_refused)

    # ---- the interface ------------------------------------------------------------------------

    def request(
        self,
        name: str,
        letters: str,
        on_done: Callable[[dict], None] | None = None,
        trigger: str = "admin",
        reason: str | None = None,
    ) -> tuple[RoleSwitch, list[Outgoing]]:
        """Start switching `name` to the roles `letters` names; SwitchError if it cannot start.
        `on_done` hears the switch's `to_dict()` once it is done or failed. The same roles again
        is a switch done at once (nothing drains). `trigger`, `reason`: who asked, and why."""
        handle = self._check(name, letters)
        before, after = role_letters(handle.spec.roles), role_letters(parse_roles(letters))
        now = self.core.clock.monotonic()
        listeners = [on_done] if on_done else []
        switch = RoleSwitch(name, before, after, now, listeners=listeners, trigger=trigger, reason=reason)
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
            switch.replied, switch.instance_timings = now, dict(msg.timings)
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
            else:
                outgoing.extend(self._migrate_decodes(switch))
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
        if Role.ENCODE in current | wanted and not handle.ready.switchable:
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
        needed = [Role.PREFILL, Role.DECODE]
        if _encodes(handle):
            needed.append(Role.ENCODE)
        for role in needed:
            others = [
                h.name
                for h in self.core.instances.values()
                if h.alive
                and h.name != handle.name
                and h.name not in self.core.draining
                and (_encodes(h) if role is Role.ENCODE else h.has(role))
            ]
            if not others:
                raise SwitchRefused(
                    f"{change}: no other live instance takes {role.value} while it drains; "
                    f"switch another instance to {role.value} first"
                )

    # ---- migrating decodes off a draining instance ---------------------------------------------

    def _migrate_decodes(self, switch: RoleSwitch) -> list[Outgoing]:
        """Move every request that decodes on the draining instance, with its KV there, to another D."""
        ledger, name = self.core.ledger, switch.instance
        outgoing = []
        for record in list(self.core.requests.values()):
            rid = record.request_id
            if ledger.holder(Work(rid, Role.DECODE)) != name or rid in switch.unmovable:
                continue
            if ledger.holder(Work(rid, Role.PREFILL)) is not None:
                continue  # no token from it yet: its KV is on its way here, or being computed
            if ledger.holder(Work(rid, Role.DECODE, MIGRATION_SOURCE)) is not None:
                continue  # moved here by another switch, not landed yet
            dest = self._decode_target(name)
            if dest is None:
                break
            self._move(record, name, dest.name)
            switch.migrated += 1
            outgoing.append(Outgoing(name, MigrateRequest(record.wire_id, dest.ready.data_address)))
        return outgoing

    def _decode_target(self, leaving: str) -> InstanceHandle | None:
        candidates = [
            h.spec
            for h in self.core.instances.values()
            if h.alive and h.name != leaving and h.name not in self.core.draining and h.has(Role.DECODE)
        ]
        if not candidates:
            return None
        return self.core.instances[least_loaded(Role.DECODE, candidates, self.core.ledger).name]

    def _move(self, record: RequestRecord, source: str, dest: str) -> None:
        ledger, rid = self.core.ledger, record.request_id
        ledger.release(Work(rid, Role.DECODE))
        ledger.reserve(Work(rid, Role.DECODE), dest, 1)
        ledger.reserve(Work(rid, Role.DECODE, MIGRATION_SOURCE), source, 1)
        record.decode = dest
        logger.info("request %s: moving its decode from %s to %s", rid, source, dest)

    def _migration_refused(self, msg: MigrationRefused) -> None:
        """The draining instance keeps the request (module docstring): the move is undone."""
        rid = self.core.wire_ids.get(msg.request_id)
        record = self.core.requests.get(rid) if rid is not None else None
        source = Work(rid or "", Role.DECODE, MIGRATION_SOURCE)
        if record is None or self.core.ledger.holder(source) != msg.instance:
            return
        ledger = self.core.ledger
        ledger.release(source)
        ledger.release(Work(rid, Role.DECODE))
        ledger.reserve(Work(rid, Role.DECODE), msg.instance, 1)
        record.decode = msg.instance
        switch = self.active.get(msg.instance)
        if switch is not None:
            switch.migrated -= 1
            switch.unmovable.add(rid)
        logger.info("request %s stays on %s: %s", rid, msg.instance, msg.error)

    def _same_life(self, switch: RoleSwitch) -> bool:
        handle = self.core.instances[switch.instance]
        return handle.alive and handle.ready is self._ready.get(switch.instance)

    def _end(self, switch: RoleSwitch, state: SwitchState, error: str | None = None) -> None:
        switch.state, switch.error = state, error
        self.core.draining.discard(switch.instance)  # placed again: new roles, or the old ones
        if error is None and "E" in switch.before and "E" not in switch.after:
            self.core.affinity.encoder_died(switch.instance)  # its encoder cache is gone
        switch.rejoined = self.core.clock.monotonic()
        del self.active[switch.instance]
        self._ready.pop(switch.instance, None)
        self.history.append(switch)
        if error is None:
            t = switch.timings()
            logger.info(
                "%s: %s -> %s in %.4f s (drain %.4f, %d moved; reconfigure %.4f: weights %.4f, "
                "memory %.4f; rejoin %.6f)",
                *(switch.instance, switch.before, switch.after, t["total"], t["drain"], switch.migrated),
                *(t["reconfigure"], t["weights"], t["memory"], t["rejoin"]),
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


def _encodes(handle: InstanceHandle) -> bool:
    """An encoder instance (E without P: one with P encodes only its own requests' images)."""
    return handle.has(Role.ENCODE) and not handle.has(Role.PREFILL)

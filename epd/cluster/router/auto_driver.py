"""The automatic role-switching policy (auto_roles.py) wired to a router: what it sees, when it
looks, and how its decisions become switches (role_switch.py).

    router add_request --> note_request: the recent workload (window_s, at most max_requests)
    router tick ---------> tick: a view of the core (roles, stats, ledger work, switches) -> observe
                           -> a Decision -> RoleSwitches.request(..., trigger="auto", reason=stage)

`observe` may simulate several layouts (tens of milliseconds to a few hundred): in the production
router it runs on one background thread (`background=True`) on a snapshot, and its decision is
applied by a later tick, on the router's thread, like every other change to the router's state.
A decision that no longer fits (the instance died, a switch started by hand meanwhile) is refused by
`RoleSwitches.request` and dropped with a log line. The simulator runs it inline (`background=False`)
so that virtual time, not the machine's speed, decides when it acts.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor

from epd.cluster.layout import Role, role_letters
from epd.cluster.router.auto_load import ClusterView, InstanceView, RecentRequest
from epd.cluster.router.auto_roles import AutoRoles, Decision
from epd.cluster.router.core import MIGRATION_SOURCE, Outgoing, RouterCore
from epd.cluster.router.role_switch import RoleSwitches, SwitchError
from epd.inputs.types import ProcessedPrompt
from epd.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

LOOK_S = 0.1  # the least time between two views in the background (each walks the ledger)


class AutoRoleSwitching:
    def __init__(
        self, core: RouterCore, switches: RoleSwitches, policy: AutoRoles, background: bool = True
    ) -> None:
        self.core, self.switches, self.policy = core, switches, policy
        self.recent: deque[RecentRequest] = deque(maxlen=max(1024, policy.config.max_requests))
        self.started: Counter[str] = Counter()  # automatic switches started, by the stage relieved
        self._executor = ThreadPoolExecutor(1, "epd-auto-roles") if background else None
        self._pending: Future[Decision | None] | None = None
        self._last_look = float("-inf")

    def note_request(self, prompt: ProcessedPrompt, params: SamplingParams) -> None:
        now = self.core.clock.monotonic()
        self.recent.append(RecentRequest(now, prompt, params))
        window = self.policy.config.window_s
        while self.recent and now - self.recent[0].arrival > window:
            self.recent.popleft()

    def tick(self) -> list[Outgoing]:
        """Look (or take the last look's answer) and start the switch it decided on, if any."""
        if self._executor is None:
            return self._apply(self.policy.observe(self.view()))
        outgoing = []
        if self._pending is not None and self._pending.done():
            decision, self._pending = self._pending.result(), None
            outgoing = self._apply(decision)
        now = self.core.clock.monotonic()
        if self._pending is None and now - self._last_look >= LOOK_S:
            self._last_look = now
            self._pending = self._executor.submit(self.policy.observe, self.view())
        return outgoing

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def view(self) -> ClusterView:
        """A snapshot of what the policy reads (nothing in it is shared with the router after)."""
        core, switching = self.core, next(iter(self.switches.active), None)
        work = self._work()
        last = {s.instance: s.rejoined for s in self.switches.history if s.rejoined is not None}
        instances = tuple(
            InstanceView(
                name,
                role_letters(handle.spec.roles),
                handle.alive,
                handle.ready.language_parameters > 0,
                handle.ready.vision_parameters > 0,
                handle.ready.switchable,
                dict(core.instance_stats.get(name, {})),
                work.get(name, {}),
                last.get(name),
            )
            for name, handle in core.instances.items()
        )
        return ClusterView(core.clock.monotonic(), instances, switching, tuple(self.recent))

    def _work(self) -> dict[str, dict[str, int]]:
        """Per instance and stage, the units of work it holds (auto_load's table)."""
        work: dict[str, dict[str, int]] = {}
        for item, (instance, amount) in self.core.ledger.outstanding().items():
            if item.stage is Role.DECODE:
                if item.item == MIGRATION_SOURCE:
                    continue  # a decode on its way to another instance: counted there
                record = self.core.requests.get(item.request_id)
                amount = (
                    0 if record is None else max(0, (record.params.max_tokens or 0) - len(record.token_ids))
                )
            held = work.setdefault(instance, {})
            held[item.stage.value] = held.get(item.stage.value, 0) + amount
        return work

    def _apply(self, decision: Decision | None) -> list[Outgoing]:
        if decision is None:
            return []
        try:
            _, outgoing = self.switches.request(
                decision.instance, decision.roles, trigger="auto", reason=decision.stage
            )
        except SwitchError as err:  # the cluster changed since the view: the next look decides again
            logger.info("role switching: not switching %s to %s: %s", decision.instance, decision.roles, err)
            return []
        self.started[decision.stage] += 1
        logger.info(
            "role switching: %s -> %s automatically, to relieve %s (%s)",
            *(decision.instance, decision.roles, decision.stage, decision.reason),
        )
        return outgoing

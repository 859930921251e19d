"""Instance processes whose connector fails the sends a rule picks, below the real retries.

`FlakyLauncher` starts instances as the local launcher does, in spawned processes, each running
`flaky_instance_main`: it registers a backend, "flaky", that wraps the cluster's real one (shm,
tcp) in `FlakyBackend` (a `DropSends`, epd.testing.faults), and runs the instance with it.
`create_connector` then puts the retries (epd.transfer.retry) on top, as for any backend, so what
is under test is the retry logic and what the instance and the router make of its outcome; the
bytes move through the real connector.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from epd.cluster.instance import InstanceConfig, instance_main
from epd.cluster.kv_handoff import request_of_key
from epd.cluster.launcher import LocalProcess, LocalProcessLauncher
from epd.cluster.spawn import children_report_to, start_process
from epd.testing.faults import DropSends
from epd.transfer.base import create_backend, register_connector


@dataclass(frozen=True)
class Drop:
    """Fail the sends of `instance` whose key starts with `key_prefix` and belongs to `request`
    (a KV key's request; None: any key), the first `times` sends of each key (None: all of them);
    `first_attempt_only`: only the keys of the request's first attempt (no "~" in its wire id)."""

    instance: str
    key_prefix: str
    request: str | None = None
    times: int | None = None
    first_attempt_only: bool = False

    def picks(self, instance: str, key: str) -> bool:
        if instance != self.instance or not key.startswith(self.key_prefix):
            return False
        if self.request is None:
            return True
        wire_id = request_of_key(key) or ""
        return wire_id.split("~")[0] == self.request and not (self.first_attempt_only and "~" in wire_id)


class FlakyBackend(DropSends):
    """The real backend of the cluster, with the sends the drops pick failed at once."""

    name = "flaky"
    real: ClassVar[str] = "shm"
    instance: ClassVar[str] = ""
    drops: ClassVar[list[Drop]] = []

    def __init__(self, **options: Any) -> None:
        super().__init__(create_backend(self.real, **options), self._picks)
        self.seen: dict[str, int] = {}  # key -> sends so far

    def _picks(self, key: str, dest: str) -> bool:
        self.seen[key] = n = self.seen.get(key, 0) + 1
        drop = next((d for d in self.drops if d.picks(self.instance, key)), None)
        return drop is not None and (drop.times is None or n <= drop.times)


def flaky_instance_main(cfg: InstanceConfig, drops: list[Drop]) -> None:
    FlakyBackend.real, FlakyBackend.instance, FlakyBackend.drops = cfg.transfer, cfg.name, drops
    register_connector("flaky", f"{__name__}:FlakyBackend")
    instance_main(replace(cfg, transfer="flaky"))


class FlakyLauncher(LocalProcessLauncher):
    def __init__(self, drops: list[Drop]) -> None:
        super().__init__()
        self.drops = drops

    def start(self, cfg: InstanceConfig) -> LocalProcess:
        with children_report_to(cfg.router_address):
            return LocalProcess(cfg.name, start_process(cfg.name, flaky_instance_main, cfg, self.drops))

"""The load ledger: what work each instance holds, as named reservations.

Every piece of work the router hands an instance is reserved under a key and released when it is
done (or when its request ends, whichever comes first). An instance's load is the sum of the
reservations it holds, so it can never go negative and nothing can leak: a request that ends
releases everything it still holds in one call.

| stage   | amount (unit of the stage) | reserved when                 | released when                    |
|---------|----------------------------|-------------------------------|----------------------------------|
| prefill | prompt tokens              | the request is placed         | its first token arrives, or end  |
| decode  | 1 (a running request)      | the request is placed         | the request ends                 |
| encode  | patches of one image       | the image is sent to encode   | EncodeDone for it, or end        |

Releasing is idempotent: a key released twice, or never reserved, is a no-op, so failure paths
can release whatever a request might hold without checking what it does. Reserving a key that is
already held is a bug in the caller and raises.
"""

from __future__ import annotations

from typing import NamedTuple

from epd.cluster.layout import Role


class Work(NamedTuple):
    """Names one reservation: a stage of a request, `item` telling apart its images."""

    request_id: str
    stage: Role
    item: int = 0


class _Reservation(NamedTuple):
    instance: str
    amount: int


class LoadLedger:
    def __init__(self) -> None:
        self._held: dict[Work, _Reservation] = {}
        self._by_request: dict[str, set[Work]] = {}
        # A running sum per instance, changed only next to _held, so load() stays O(1).
        self._loads: dict[str, int] = {}

    def reserve(self, work: Work, instance: str, amount: int) -> None:
        """Charge `amount` of `work` to `instance` until it is released."""
        if amount < 0:
            raise ValueError(f"cannot reserve a negative amount ({amount}) for {work}")
        if work in self._held:
            raise ValueError(f"{work} is already reserved on {self._held[work].instance}")
        self._held[work] = _Reservation(instance, amount)
        self._by_request.setdefault(work.request_id, set()).add(work)
        self._loads[instance] = self._loads.get(instance, 0) + amount

    def release(self, work: Work) -> None:
        """Give back `work`'s reservation; a no-op if it is not held."""
        reservation = self._held.pop(work, None)
        if reservation is None:
            return
        keys = self._by_request[work.request_id]
        keys.discard(work)
        if not keys:
            del self._by_request[work.request_id]
        self._loads[reservation.instance] -= reservation.amount

    def release_request(self, request_id: str) -> None:
        """Give back everything `request_id` still holds (a no-op if nothing)."""
        for work in list(self._by_request.get(request_id, ())):
            self.release(work)

    def load(self, instance: str) -> int:
        """What `instance` holds, summed over stages (0 for an instance never charged)."""
        return self._loads.get(instance, 0)

    def holder(self, work: Work) -> str | None:
        """The instance `work` is reserved on, or None if it is not held."""
        reservation = self._held.get(work)
        return None if reservation is None else reservation.instance

    def instances_of(self, request_id: str) -> set[str]:
        """Every instance that holds work of `request_id`: those whose failure fails it."""
        return {self._held[work].instance for work in self._by_request.get(request_id, ())}

    def works_on(self, request_id: str, instance: str) -> list[Work]:
        """The work of `request_id` that `instance` holds, in a fixed order."""
        works = self._by_request.get(request_id, ())
        return sorted(w for w in works if self._held[w].instance == instance)

    def outstanding(self) -> dict[Work, tuple[str, int]]:
        """Every live reservation: work -> (instance, amount)."""
        return {work: (r.instance, r.amount) for work, r in self._held.items()}

    def is_empty(self) -> bool:
        return not self._held

"""Bounded retries on the same pair (epd.transfer.retry), over real backends that drop sends.

`DropSends` (epd.testing.faults) sits between the retries and a real connector: it fails the
sends its rule picks without passing them on, and passes on the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from epd.testing.faults import DropSends
from epd.transfer import create_connector
from epd.transfer.base import create_backend
from epd.transfer.retry import GAVE_UP, RetryingConnector

from .helpers import BACKENDS, collect_received, collect_sent, digest, payload


def first_sends_of_each_key(n: int) -> Callable[[str, str], bool]:
    seen: dict[str, int] = {}

    def drop(key: str, dest: str) -> bool:
        seen[key] = seen.get(key, 0) + 1
        return seen[key] <= n

    return drop


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_sends_are_retried_on_the_same_pair_and_arrive_once(backend: str) -> None:
    with create_backend(backend) as consumer:
        flaky = DropSends(create_backend(backend), first_sends_of_each_key(2))
        with RetryingConnector(flaky, retries=2) as producer:
            if backend == "local":
                consumer = producer  # a local connector sends only to itself
            for i in range(4):
                producer.send(consumer.address, f"k{i}", payload(i), {"i": i})
            results = collect_sent(producer, 4)
            assert all(r.ok for r in results), [r.error for r in results]
            received = collect_received(consumer, 4)
            assert sorted(r.key for r in received) == [f"k{i}" for i in range(4)]
            assert all(digest(r.tensors) == digest(payload(r.meta["i"])) for r in received)
            assert len(flaky.dropped) == 8
            assert producer.stats() == {"transfer_retries_total": 8, "transfer_gave_up_total": 0}
            assert producer.poll_sent() == [], "each send is reported once"


@pytest.mark.parametrize("backend", ["shm", "tcp"])
def test_after_the_last_retry_the_failure_is_reported_once_and_names_the_attempts(backend: str) -> None:
    with create_backend(backend) as consumer:
        flaky = DropSends(create_backend(backend), lambda key, dest: key == "lost")
        with RetryingConnector(flaky, retries=2) as producer:
            producer.send(consumer.address, "lost", payload(1))
            producer.send(consumer.address, "fine", payload(2))
            results = {r.key: r for r in collect_sent(producer, 2)}
            assert results["fine"].ok and not results["lost"].ok
            assert results["lost"].error == f"{GAVE_UP} 3 attempts: dropped by the test"
            assert [r.key for r in collect_received(consumer, 1)] == ["fine"]
            assert producer.stats() == {"transfer_retries_total": 2, "transfer_gave_up_total": 1}


def test_an_attempt_that_times_out_is_retried_then_given_up() -> None:
    """A dest that takes nothing: each attempt waits send_timeout_s, the last one's error is kept."""
    with create_connector("tcp", send_timeout_s=0.2, retries=1) as producer:
        producer.send("tcp://127.0.0.1:9", "k", payload(0))  # port 9 (discard): nobody listens here
        [result] = collect_sent(producer, 1, timeout=20)
        assert not result.ok and result.error.startswith(f"{GAVE_UP} 2 attempts: peer")
        assert "within 0.2s" in result.error and result.seconds >= 0.4
        assert producer.stats()["transfer_retries_total"] == 1


def test_create_connector_retries_by_default_and_keeps_the_backend_in_view() -> None:
    with create_connector("shm") as conn:
        assert isinstance(conn, RetryingConnector) and conn.retries == 2
        assert conn.name == "shm" and conn.segment_prefix == conn.inner.segment_prefix
    with create_connector("local", retries=0) as conn:
        assert not isinstance(conn, RetryingConnector) and conn.name == "local"
    with pytest.raises(ValueError, match="retries"):
        RetryingConnector(create_backend("local"), retries=-1)


def test_bad_arguments_still_raise_at_once_and_leave_nothing_outstanding() -> None:
    with create_connector("shm") as producer:
        with pytest.raises(TypeError):
            producer.send(producer.address, "k", {"x": [1, 2]})  # type: ignore[dict-item]
        assert producer._outstanding == {}

"""A request's stage times from its lifetime events (epd.lifetime.stage_breakdown)."""

from __future__ import annotations

import pytest

from epd.lifetime import Event, LifetimeEvent, stage_breakdown


def events(*rows: tuple[Event, float, int | None]) -> list[LifetimeEvent]:
    return [LifetimeEvent(event, time, "e0", item) for event, time, item in rows]


def test_images_encoded_in_two_batches_count_only_the_last_transfer():
    """Images 0-1 in a first batch (0-50 ms), image 2 in a second (50-100 ms) on one encoder: the
    encode spans both batches; the transfer is what came after the last image was encoded (3 ms),
    not the second batch's encode as well (53 ms from the first transfer's start)."""
    breakdown = stage_breakdown(
        events(
            (Event.ENCODE_START, 0.000, 0),
            (Event.ENCODE_START, 0.000, 1),
            (Event.ENCODE_END, 0.050, 0),
            (Event.ENCODE_END, 0.050, 1),
            (Event.MM_TRANSFER_START, 0.050, 0),
            (Event.MM_TRANSFER_START, 0.050, 1),
            (Event.MM_TRANSFER_END, 0.052, None),
            (Event.MM_TRANSFER_END, 0.052, None),
            (Event.ENCODE_START, 0.050, 2),
            (Event.ENCODE_END, 0.100, 2),
            (Event.MM_TRANSFER_START, 0.100, 2),
            (Event.MM_TRANSFER_END, 0.103, None),
            (Event.PREFILL_START, 0.110, None),
            (Event.PREFILL_END, 0.200, None),
        )  # fmt: skip
    )
    assert breakdown["encode"] == pytest.approx(0.100)
    assert breakdown["mm_transfer"] == pytest.approx(0.003)
    assert breakdown["prefill"] == pytest.approx(0.090)


def test_images_encoded_in_parallel_count_the_transfer_left_after_the_last_encode():
    """Two encoders end at 50 and 60 ms; the first image's transfer is slow and lands at 70 ms:
    10 ms of transfer are left once both encodes are done."""
    breakdown = stage_breakdown(
        events(
            (Event.ENCODE_START, 0.0, 0),
            (Event.ENCODE_START, 0.0, 1),
            (Event.ENCODE_END, 0.05, 0),
            (Event.ENCODE_END, 0.06, 1),
            (Event.MM_TRANSFER_START, 0.05, 0),
            (Event.MM_TRANSFER_START, 0.06, 1),
            (Event.MM_TRANSFER_END, 0.061, None),
            (Event.MM_TRANSFER_END, 0.07, None),
        )  # fmt: skip
    )
    assert breakdown["encode"] == pytest.approx(0.06)
    assert breakdown["mm_transfer"] == pytest.approx(0.01)


def test_a_transfer_that_landed_before_the_request_reached_p_adds_nothing():
    """Image 1's embedding reached P before P knew the request (no end recorded for it): its start,
    the latest, comes after every end, and mm_transfer is 0, not negative."""
    breakdown = stage_breakdown(
        events(
            (Event.MM_TRANSFER_START, 0.05, 0),
            (Event.MM_TRANSFER_END, 0.051, None),
            (Event.MM_TRANSFER_START, 0.06, 1),
        )  # fmt: skip
    )
    assert breakdown["mm_transfer"] == 0.0

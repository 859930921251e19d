"""The interference rule of epd.sim.gpu_share: each lane alone runs at full speed; side by side,
each at `overlap_speed` of it."""

from __future__ import annotations

import pytest

from epd.sim.gpu_share import SharedGpuClock


def test_without_a_tower_job_compute_takes_its_own_time():
    clock = SharedGpuClock(0.6)
    clock.advance(0.25)
    clock.advance_to(1.0)
    clock.advance(0.5)
    assert clock.now() == pytest.approx(1.5)


def test_a_tower_job_alone_takes_its_own_time():
    clock = SharedGpuClock(0.6, start=2.0)
    span = clock.encode_beside(0.3)
    assert clock.next_tower_end() == pytest.approx(2.3)
    clock.advance_to(2.29)
    assert not span.finished
    clock.advance_to(3.0)
    assert (span.start, span.end) == (2.0, pytest.approx(2.3))


def run_side_by_side(speed: float, step: float, tower: float) -> tuple[float, float]:
    """A step and a tower job started together: when each ends."""
    clock = SharedGpuClock(speed)
    span = clock.encode_beside(tower)
    clock.advance(step)
    step_end = clock.now()
    clock.advance_to(max(step_end, clock.next_tower_end() or 0.0))  # what is left of the job, alone
    return step_end, span.end


@pytest.mark.parametrize("step, tower", [(1.0, 0.3), (0.3, 1.0), (0.5, 0.5)])
def test_at_half_speed_overlap_gains_nothing_and_at_full_speed_costs_nothing(step, tower):
    assert max(run_side_by_side(0.5, step, tower)) == pytest.approx(step + tower)
    assert run_side_by_side(1.0, step, tower) == (pytest.approx(step), pytest.approx(tower))


@pytest.mark.parametrize("speed", [0.2, 0.63, 0.9])
def test_the_shorter_one_ends_at_its_slowed_time_and_the_other_goes_on_alone(speed):
    step_end, tower_end = run_side_by_side(speed, 1.0, 0.3)
    assert tower_end == pytest.approx(0.3 / speed)
    assert step_end == pytest.approx(0.3 / speed + 0.7)
    step_end, tower_end = run_side_by_side(speed, 0.3, 1.0)
    assert (step_end, tower_end) == (pytest.approx(0.3 / speed), pytest.approx(0.3 / speed + 0.7))


def test_a_job_worn_down_by_many_steps_ends_with_the_last_of_them():
    clock = SharedGpuClock(0.25)
    span = clock.encode_beside(0.5)
    for _ in range(5):
        clock.advance(0.1)  # each step and the job at a quarter of their speeds: 0.4 s a step
    assert span.end == pytest.approx(2.0)
    assert clock.now() == pytest.approx(2.0)


def test_tower_jobs_run_one_after_another_and_a_free_one_ends_as_it_starts():
    clock = SharedGpuClock(0.5)
    first, second = clock.encode_beside(0.2), clock.encode_beside(0.3)
    assert second.start is None
    clock.advance_to(1.0)
    assert first.end == second.start == pytest.approx(0.2)
    assert second.end == pytest.approx(0.5)
    free = clock.encode_beside(0.0)
    assert free.start == free.end == 1.0


def test_work_inside_tower_work_is_counted_not_spent():
    clock = SharedGpuClock(0.5)
    with clock.tower_work() as work:
        clock.advance(0.4)
        clock.advance(0.1)
    assert work.seconds == pytest.approx(0.5)
    assert clock.now() == 0.0


def test_the_speed_is_a_fraction_of_the_solo_speed():
    for speed in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            SharedGpuClock(speed)

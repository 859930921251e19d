"""The router's prediction of a prompt's prefill (what an encoder's deadline leaves room for) from
--slo-profile: the profile's prefill model for one whole-prompt step."""

from __future__ import annotations

import pytest

from epd.engine.scheduler import ScheduledBatch
from epd.engine.step_estimator import Seq, prefill_seconds_of
from epd.plan.profile import load_profile


def test_the_prefill_of_a_prompt_is_the_profile_s_step_for_it(tiny_profile):
    seconds = prefill_seconds_of(str(tiny_profile.path))
    costs = load_profile(tiny_profile.path).compute_costs()
    for tokens in (16, 512, 4096):
        step = ScheduledBatch([Seq(tokens, 0, tokens)], [tokens])  # type: ignore[list-item]
        assert seconds(tokens) == pytest.approx(costs.step_seconds(step))
    assert seconds(4096) > seconds(16) > 0
    assert prefill_seconds_of(None) is None

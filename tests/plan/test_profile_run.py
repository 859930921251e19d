"""A real profile of the tiny checkpoint on the CPU, end to end: measured with the real runner and
vision tower, fitted, printed, saved, loaded; its costs behave as the work they stand for, and the
simulator runs on them."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import pytest

from epd.engine.request import Request
from epd.engine.scheduler import ScheduledBatch
from epd.inputs.types import ProcessedPrompt
from epd.plan.profile import Profile, load_profile
from epd.plan.profile.profiler import fit_measurements
from epd.sampling_params import SamplingParams
from epd.sim import ClusterSpec, SimCluster, Workload, engine_config, make_requests, simulate
from epd.sim.costs import FREE


@pytest.fixture(scope="module")
def profile(tiny_profile) -> Profile:
    return load_profile(tiny_profile.path)


def test_the_json_says_what_was_measured_where(tiny_profile):
    data = json.loads(tiny_profile.path.read_text())
    meta = data["meta"]
    assert (meta["device"], meta["device_name"], meta["dtype"]) == ("cpu", "cpu", "float32")
    assert meta["load_format"] == "safetensors"  # the tiny checkpoint has weights
    config = json.loads((tiny_profile.model / "config.json").read_text())
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    assert meta["model_config_sha256"] == hashlib.sha256(canonical).hexdigest()
    assert meta["epd_version"] and meta["torch_version"] and meta["graph_sizes"] == []
    assert set(data["stages"]) == {"prefill", "decode", "encode", "front_end", "patches"}
    assert set(data["transfers"]) == {"shm", "tcp"}
    for stage in [*data["stages"].values(), *data["transfers"].values()]:
        assert stage["measurements"] and all(m["seconds"] > 0 for m in stage["measurements"])
        assert set(stage["fit"]["coefficients"]) == set(stage["fit"]["terms"])
        assert stage["fit"]["num_points"] == len(stage["measurements"])


def test_every_fit_and_its_error_is_printed(tiny_profile, profile):
    for name in [*profile.stages, *(f"transfer {t}" for t in profile.transfers)]:
        assert f"| {name}" in tiny_profile.printed
    for stage in [*profile.stages.values(), *profile.transfers.values()]:
        fit = stage.fit
        assert math.isfinite(fit.rms_rel_error) and fit.max_rel_error >= fit.rms_rel_error
        assert f"{fit.rms_rel_error:.1%} | {fit.max_rel_error:.1%}" in tiny_profile.printed


def test_saved_timings_give_the_saved_fits_back(profile):
    for name, stage in profile.stages.items():
        assert fit_measurements(name, stage.measurements, profile.meta.graph_sizes).fit == stage.fit
    assert Profile.from_json(profile.to_json()) == profile


def test_costs_grow_with_the_work(profile):
    costs = profile.compute_costs()
    decode = lambda batch, context: costs.step_seconds(batch_of([(1, context)] * batch))  # noqa: E731
    prefill = lambda seqs, new: costs.step_seconds(batch_of([(new, 0)] * seqs))  # noqa: E731
    assert 0 < prefill(1, 8) < prefill(1, 256) < prefill(2, 256)
    assert 0 < decode(1, 32) < decode(16, 256)
    assert decode(4, 32) <= decode(4, 256) and decode(1, 256) <= decode(16, 256)
    small, large = [(1, 4, 4)], [(1, 16, 16)] * 3
    assert 0 < costs.encode_seconds(small) < costs.encode_seconds(large)
    for name in profile.transfers:
        latency, bandwidth = profile.transfer(name)
        assert latency >= 0 and bandwidth > 0
        assert latency + (1 << 20) / bandwidth > 0


def batch_of(seqs: list[tuple[int, int]]):
    """A real scheduled batch whose request i computes seqs[i] = (new, context) tokens: decodes
    (one new token) have generated one token after a `context`-token prompt."""
    batch = ScheduledBatch()
    for i, (new, context) in enumerate(seqs):
        prompt_len = context if new == 1 else new
        ids = [(7 * i + j) % 300 for j in range(prompt_len)]
        request = Request(f"r{i}", ProcessedPrompt(ids, [], []), SamplingParams(), merge_size=2)
        if new == 1:
            request.output_token_ids, request.num_computed_tokens = [1], context
        batch.add(request, new)
    return batch


def test_the_simulator_runs_on_the_fitted_costs(tiny_profile, profile):
    engine = engine_config(str(tiny_profile.model))
    requests = make_requests(Workload(num_requests=30, rate_per_s=20.0), engine.model)
    timed = simulate(SimCluster(ClusterSpec("1E+1P+1D", engine, costs=profile.compute_costs())), requests)
    free = simulate(SimCluster(ClusterSpec("1E+1P+1D", engine, costs=FREE)), requests)
    assert timed.leftovers == [] and len(timed.outputs) == len(requests)
    tokens = lambda result: {r: o.outputs[0].token_ids for r, o in result.outputs.items()}  # noqa: E731
    assert tokens(timed) == tokens(free)  # costs move time, never tokens
    assert all(busy > 0 for busy in timed.busy_s.values())
    assert sum(free.busy_s.values()) == 0 < sum(timed.busy_s.values())


def test_help_explains_every_option_and_imports_no_torch():
    code = (
        "import argparse, sys\n"
        "from epd.plan.profile.cli import add_profile_parser\n"
        "sub = argparse.ArgumentParser().add_subparsers()\n"
        "add_profile_parser(sub, argparse.HelpFormatter)\n"
        "parser = sub.choices['profile']\n"
        "print(parser.format_help())\n"
        "assert all(a.help for a in parser._actions), 'an option without help'\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--decode-batches" in out.stdout and "--transfer-mb" in out.stdout

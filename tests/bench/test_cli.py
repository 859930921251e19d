"""`epd bench` flags: every one the issue names, and the values they turn into."""

from __future__ import annotations

import math

import pytest

from epd.bench.serve.cli import spec_from_args
from epd.bench.serve.spec import SizeBucket
from epd.cli import build_parser, main

ISSUE_FLAGS = [
    "--base-url", "--model", "--workload", "--images-per-request", "--image-size", "--image-reuse",
    "--prompt-tokens", "--output-tokens", "--text-only-share", "--dataset-path", "--rate", "--rates",
    "--arrival", "--burstiness", "--max-concurrency", "--num-requests", "--warmup", "--seed", "--slo-ttft",
    "--slo-tpot", "--out",
]  # fmt: skip


def help_of(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_flag_of_the_issue(capsys):
    assert "bench" in help_of(capsys)
    text = help_of(capsys, "bench")
    for flag in ISSUE_FLAGS:
        assert flag in text, flag
    sweep = help_of(capsys, "bench", "sweep")
    for flag in ["--layouts", "--devices", "--serve-args", *ISSUE_FLAGS[2:]]:
        assert flag in sweep, flag


def test_flags_become_a_spec():
    args = build_parser().parse_args(
        ["bench", "--image-size", "448x448:3,1344x1344", "--images-per-request", "1-4", "--rates", "1,2"]
        + ["--arrival", "gamma", "--burstiness", "2", "--slo-ttft", "0.5", "--workload", "shapes"]
    )
    spec = spec_from_args(args, args.base_url, args.model)
    assert spec.workload.image_sizes == (SizeBucket(448, 448, 3.0), SizeBucket(1344, 1344, 1.0))
    assert spec.workload.images_per_request == (1, 4)
    assert spec.workload.output_tokens == 64  # the shapes default: the task's longest answer fits
    assert [(a.rate, a.process, a.burstiness) for a in spec.arrivals] == [(1, "gamma", 2), (2, "gamma", 2)]
    assert spec.slo.ttft == 0.5 and spec.slo.tpot is None
    closed = spec_from_args(build_parser().parse_args(["bench", "--max-concurrency", "4"]), "u", None)
    assert math.isinf(closed.arrivals[0].rate) and closed.arrivals[0].max_concurrency == 4
    assert closed.workload.output_tokens == 128 and closed.workload.ignore_eos


@pytest.mark.parametrize(
    "bad",
    [
        ["--rate", "1", "--rates", "1,2"],
        ["--image-reuse", "1.5"],
        ["--workload", "jsonl"],
        ["--num-requests", "0"],
    ],
)
def test_bad_flags_are_usage_errors(bad: list[str], capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *bad])
    assert exit_info.value.code == 2

"""The results file: one JSON document per benchmark (a rate sweep is one document).

    {"format": "epd-bench/1", "label", "created", "git_revision": {"commit", "dirty"},
     "config": {...every option...},
     "server": {"base_url", "model", "models": <the /v1/models answer>, "epd_timings"},
     "runs": [{"rate", "arrival": {...}, "summary": {...}, "stages": {...} | null,
               "requests": [{...every request's timings...}]}],
     "sweep": {"rates", "attainment", "goodput_rate", "attainment_target"}}

Infinite rates (everything at once / closed loop) are written as null: JSON has no infinity.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any

from epd.bench.serve.client import RequestResult
from epd.bench.serve.metrics import ATTAINMENT_TARGET, goodput_rate, stage_means, summarize
from epd.bench.serve.spec import SLO, ArrivalSpec, BenchSpec

FORMAT = "epd-bench/1"
RESULTS_NAME = "results.json"


def run_record(arrival: ArrivalSpec, results: list[RequestResult], duration: float, slo: SLO) -> dict:
    return {
        "rate": arrival.rate,
        "label": arrival.label,
        "arrival": dataclasses.asdict(arrival),
        "summary": summarize(results, duration, slo),
        "stages": stage_means(results),
        "requests": [r.to_dict() for r in results],
    }


def document(spec: BenchSpec, server: dict, runs: list[dict]) -> dict:
    attain = [run["summary"]["slo_attainment"] for run in runs]
    rates = [run["rate"] for run in runs]
    return {
        "format": FORMAT,
        "label": spec.label,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_revision": git_revision(),
        "config": dataclasses.asdict(spec) | {"api_key": "***" if spec.api_key else None},
        "server": server,
        "runs": runs,
        "sweep": {
            "rates": rates,
            "attainment": attain,
            "goodput_rate": goodput_rate(rates, attain),
            "attainment_target": ATTAINMENT_TARGET,
        },
    }


def git_revision() -> dict | None:
    """The commit epd runs from and whether its tree has changes; None outside a git checkout."""
    root = Path(__file__).resolve().parents[3]
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout.strip()


def save(doc: dict, out_dir: Path) -> Path:
    path = out_dir / RESULTS_NAME
    path.write_text(json.dumps(_json_safe(doc), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def load(path: str | Path) -> dict:
    """A results document, with null rates read back as infinite."""
    p = Path(path)
    doc = json.loads((p / RESULTS_NAME if p.is_dir() else p).read_text(encoding="utf-8"))
    for run in doc["runs"]:
        run["rate"] = math.inf if run["rate"] is None else run["rate"]
    doc["sweep"]["rates"] = [run["rate"] for run in doc["runs"]]
    return doc


def results_of(run: dict) -> list[RequestResult]:
    return [RequestResult.from_dict(r) for r in run["requests"]]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value

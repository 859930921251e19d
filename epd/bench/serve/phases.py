"""A phased workload (`epd bench --phases`): phases back to back on one timeline, each its own mix.

    --phases phases.yaml        (or .json, or the JSON inline)
    phases:                     (a bare list works too)
      - {name: short, image_size: 1344x1344, output_tokens: 16, rate: 4, duration: 60}
      - {name: long, image_size: 1344x1344, output_tokens: 512, rate: 1, num_requests: 100}

| key                                  | means (as the flag of the same name)      | default        |
|--------------------------------------|-------------------------------------------|----------------|
| name                                 | the phase's label                         | phase<i>       |
| workload, images_per_request,        | the phase's requests                      | the command's  |
| image_size, image_reuse,             |                                           | flags          |
| prompt_tokens, output_tokens,        |                                           |                |
| text_only_share, temperature,        |                                           |                |
| ignore_eos                           |                                           |                |
| rate, arrival, burstiness,           | its arrivals (a closed loop gates by      | the command's  |
| max_concurrency                      | phase)                                    | flags          |
| num_requests or duration (seconds)   | how long it lasts: a count, or arrivals   | num_requests   |
|                                      | drawn until the duration is over          | of the command |

Phase k starts when phase k-1's arrivals end (its duration; or its last arrival plus one mean
gap), not when its requests finish: the load shifts while the previous mix still runs, as a real
shift does. Each phase is a run of the results file (its summary, stages and requests, and
"phase": where it starts and what it sent); "overall" summarises all phases together.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from epd.bench.serve.arrivals import arrival_offsets, gaps
from epd.bench.serve.client import RequestResult
from epd.bench.serve.metrics import summarize
from epd.bench.serve.results import run_record
from epd.bench.serve.spec import (
    ARRIVALS,
    DEFAULT_OUTPUT_TOKENS,
    SLO,
    WORKLOADS,
    ArrivalSpec,
    PhaseSpec,
    WorkloadSpec,
    parse_int_range,
    parse_sizes,
    share,
)

MAX_PHASE_REQUESTS = 1_000_000  # a bound on a duration phase's draws (a typo'd rate or duration)


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or int(value) < 1:
        raise ValueError(f"not a positive integer: {value!r}")
    return int(value)


def _positive(value: object) -> float:
    number = float(value)  # type: ignore[arg-type]
    if not number > 0:
        raise ValueError(f"not > 0: {value!r}")
    return number


def _choice(options: tuple[str, ...]):
    def parse(value: object) -> str:
        if value not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return str(value)

    return parse


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"not true or false: {value!r}")
    return value


# key -> (the config it changes, its field there, the parser of its value)
_WORKLOAD_KEYS = {
    "workload": ("kind", _choice(WORKLOADS)),
    "images_per_request": ("images_per_request", lambda v: parse_int_range(str(v))),
    "image_size": ("image_sizes", lambda v: parse_sizes(str(v))),
    "image_reuse": ("image_reuse", lambda v: share(str(v))),
    "prompt_tokens": ("prompt_tokens", _positive_int),
    "output_tokens": ("output_tokens", _positive_int),
    "text_only_share": ("text_only_share", lambda v: share(str(v))),
    "temperature": ("temperature", float),
    "ignore_eos": ("ignore_eos", _bool),
}
_ARRIVAL_KEYS = {
    "rate": ("rate", _positive),
    "arrival": ("process", _choice(ARRIVALS)),
    "burstiness": ("burstiness", _positive),
    "max_concurrency": ("max_concurrency", _positive_int),
}
_OWN_KEYS = ("name", "num_requests", "duration")
KEYS = (*_OWN_KEYS, *_WORKLOAD_KEYS, *_ARRIVAL_KEYS)


def load_phases(
    text: str, workload: WorkloadSpec, arrival: ArrivalSpec, num_requests: int
) -> tuple[PhaseSpec, ...]:
    """The phases `text` describes (a .json/.yaml/.yml file, or JSON inline), each key it leaves out
    taken from the command's `workload`, `arrival` and `num_requests`. ValueError says what is wrong."""
    entries = _entries(_read(text))
    return tuple(_phase(i, entry, workload, arrival, num_requests) for i, entry in enumerate(entries))


def _read(text: str) -> object:
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        return _json(stripped, "--phases")
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"--phases: no file {text!r} (give a .json/.yaml file, or the JSON itself)")
    body = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(body)
        except yaml.YAMLError as err:
            raise ValueError(f"--phases {text}: not valid YAML: {err}") from None
    return _json(body, f"--phases {text}")


def _json(body: str, where: str) -> object:
    try:
        return json.loads(body)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON: {err}") from None


def _entries(doc: object) -> list[dict]:
    entries = doc.get("phases") if isinstance(doc, dict) else doc
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError('--phases: expected a non-empty list of phase objects (or {"phases": [...]})')
    return entries


def _phase(
    index: int, entry: dict, workload: WorkloadSpec, arrival: ArrivalSpec, num_requests: int
) -> PhaseSpec:
    name = str(entry.get("name", f"phase{index}"))
    where = f"--phases: phase {index} ({name})"
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (the keys: {', '.join(KEYS)})")
    try:
        work = _changed(workload, entry, _WORKLOAD_KEYS)
        if "workload" in entry and "output_tokens" not in entry:  # that kind's default, as the flags do
            work = dataclasses.replace(work, output_tokens=DEFAULT_OUTPUT_TOKENS[work.kind])
        arrives = _changed(arrival, entry, _ARRIVAL_KEYS)
        count = _positive_int(entry["num_requests"]) if "num_requests" in entry else None
        duration = _positive(entry["duration"]) if "duration" in entry else None
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise ValueError(f"{where}: {err}") from None
    if count is not None and duration is not None:
        raise ValueError(f"{where}: give num_requests or duration, not both")
    if duration is not None and math.isinf(arrives.rate):
        raise ValueError(f"{where}: a duration needs a finite rate (arrivals are drawn until it ends)")
    if duration is None and count is None:
        count = num_requests
    return PhaseSpec(name, work, arrives, count, duration)


def _changed(config, entry: dict, keys: dict):
    changes = {fld: parse(entry[key]) for key, (fld, parse) in keys.items() if key in entry}
    return dataclasses.replace(config, **changes)


# ---- the timeline -----------------------------------------------------------------------------


def phase_offsets(phase: PhaseSpec, seed: int) -> tuple[list[float], float]:
    """Send times within the phase (from its start) and the phase's length: when the next begins."""
    arrival = phase.arrival
    if phase.duration_s is None:
        offsets = arrival_offsets(phase.num_requests or 0, arrival, seed)
        mean_gap = 0.0 if math.isinf(arrival.rate) else 1.0 / arrival.rate
        return offsets, (offsets[-1] + mean_gap if offsets else 0.0)
    rng = np.random.default_rng(seed)
    offsets, now = [], 0.0
    while now < phase.duration_s and len(offsets) < MAX_PHASE_REQUESTS:
        offsets.append(now)
        now += float(gaps(1, arrival.rate, arrival.process, arrival.burstiness, rng)[0])
    return offsets, phase.duration_s


def phase_records(
    phases: tuple[PhaseSpec, ...],
    starts: list[float],
    results: list[RequestResult],
    counts: list[int],
    duration: float,
    slo: SLO,
) -> tuple[list[dict], dict]:
    """A run record per phase (results in phase order, `counts` of each) and the overall summary."""
    runs, first = [], 0
    for k, (phase, start, n) in enumerate(zip(phases, starts, counts)):
        mine = results[first : first + n]
        first += n
        record = run_record(phase.arrival, mine, _span(mine, start), slo)
        record["label"] = phase.label
        record["phase"] = {
            "index": k,
            "name": phase.name,
            "start_s": start,
            "num_requests": n,
            "duration_s": phase.duration_s,
            "workload": dataclasses.asdict(phase.workload),
        }
        runs.append(record)
    return runs, summarize(results, duration, slo)


def _span(results: list[RequestResult], start: float) -> float:
    """From the phase's start to its last answer."""
    ends = [(r.sent_s or r.scheduled_s) + (r.e2e or 0.0) for r in results]
    return max(ends, default=start) - start

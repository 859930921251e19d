"""A device profile on disk: what was measured where, the raw timings and the fitted models.

    {"format": 1,
     "meta": {"device": "cuda:0", "device_name": "NVIDIA H200", "dtype": "bfloat16",
              "model": DIR, "model_config_sha256": ..., "epd_version": ..., "graph_sizes": [...], ...},
     "stages": {"prefill" | "decode" | "encode":
                  {"fit": {terms, coefficients, errors}, "measurements": [{"shape": ..., "seconds": ...}]}},
     "transfers": {"shm" | "tcp" | "cuda_ipc": {"devices": [...], "fit": ..., "measurements": [...]}},
     "parallel": {"2": {"devices": ["cuda:0", "cuda:1"], "backend": "nccl", "graph_sizes": [],
                        "stages": {"prefill" | "decode": {"fit": ..., "measurements": [...]}}}}}

"stages" are degree 1 (one device); "parallel" (`epd profile --tp 1,2`) holds the prefill and decode
steps of a tensor-parallel instance of each other degree measured (epd.plan.profile.measure_parallel);
vision batches run on rank 0 alone at every degree, so the degree-1 encode model prices them. A
profile without "parallel" (every profile before it) is degree 1 only.

Shapes as in epd.plan.profile.features, in runs of equal items: [[count, new, context], ...] per
step, [[count, t, h, w], ...] per vision batch; a byte count per transfer. The raw timings are kept
so that a later fit (other terms) needs no device.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from epd.plan.profile.fit import StageFit

if TYPE_CHECKING:
    from epd.plan.profile.costs import ProfileCosts, ProfileHostCosts

FORMAT = 1
COMPUTE_STAGES = ("prefill", "decode", "encode")
PARALLEL_STAGES = ("prefill", "decode")  # what a tensor-parallel degree changes (measure_parallel.py)
HOST_STAGES = ("front_end", "patches")  # the host's CPU, around the model (measure_host.py)


@dataclass(frozen=True)
class Measurement:
    shape: Any  # JSON-shaped: see the module docstring
    seconds: float  # median over the repetitions


@dataclass(frozen=True)
class StageProfile:
    fit: StageFit
    measurements: tuple[Measurement, ...]
    devices: tuple[str, ...] = ()  # transfers only: (producer, consumer)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"fit": self.fit.to_json()}
        if self.devices:
            out["devices"] = list(self.devices)
        out["measurements"] = [asdict(m) for m in self.measurements]
        return out

    @classmethod
    def from_json(cls, data: dict) -> StageProfile:
        measurements = tuple(Measurement(m["shape"], float(m["seconds"])) for m in data["measurements"])
        return cls(StageFit.from_json(data["fit"]), measurements, tuple(data.get("devices", ())))


@dataclass(frozen=True)
class ParallelProfile:
    """The steps of a tensor-parallel instance of one degree > 1."""

    stages: dict[str, StageProfile]  # "prefill", "decode" (those measured)
    devices: tuple[str, ...]  # of its ranks, rank 0 first
    backend: str  # of its collectives: "gloo" or "nccl"
    graph_sizes: tuple[int, ...] = ()  # decode batch sizes replayed as CUDA graphs (): none

    def to_json(self) -> dict:
        return {
            "devices": list(self.devices),
            "backend": self.backend,
            "graph_sizes": list(self.graph_sizes),
            "stages": {name: stage.to_json() for name, stage in self.stages.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> ParallelProfile:
        stages = {name: StageProfile.from_json(s) for name, s in data["stages"].items()}
        return cls(stages, tuple(data["devices"]), data["backend"], tuple(data.get("graph_sizes", ())))


@dataclass(frozen=True)
class ProfileMeta:
    device: str  # as given: "cpu", "cuda:0"
    device_name: str  # torch.cuda.get_device_name(), or "cpu"
    dtype: str
    model: str  # the model directory profiled
    model_config_sha256: str  # of config.json, canonical JSON: the same config, the same hash
    epd_version: str
    torch_version: str
    load_format: str
    attention_backend: str
    graph_sizes: tuple[int, ...] = ()  # decode batch sizes replayed as CUDA graphs (): none
    created: str = ""  # ISO time
    wall_seconds: float = 0.0  # how long profiling took
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> ProfileMeta:
        return cls(**{**data, "graph_sizes": tuple(data.get("graph_sizes", ()))})


@dataclass(frozen=True)
class Profile:
    meta: ProfileMeta
    stages: dict[str, StageProfile]  # "prefill", "decode", "encode", "front_end", "patches" (those measured)
    transfers: dict[str, StageProfile] = field(default_factory=dict)  # by connector name
    parallel: dict[int, ParallelProfile] = field(default_factory=dict)  # by tensor-parallel degree > 1

    @property
    def degrees(self) -> tuple[int, ...]:
        """The tensor-parallel degrees whose steps this profile prices: 1 and those measured."""
        return (1, *sorted(d for d, p in self.parallel.items() if set(PARALLEL_STAGES) <= set(p.stages)))

    def compute_costs(self) -> ProfileCosts:
        """The fitted compute models as the simulator's `ComputeCosts` (epd.engine.scripted_runner):
        degree 1's, with the other degrees' at `ProfileCosts.at_degree`."""
        from epd.plan.profile.costs import DegreeFits, ProfileCosts

        missing = [s for s in COMPUTE_STAGES if s not in self.stages]
        if missing:
            raise ValueError(f"this profile measured no {', '.join(missing)}: no compute cost model")
        fits = {name: self.stages[name].fit for name in COMPUTE_STAGES}
        parallel = {
            d: DegreeFits(p.stages["prefill"].fit, p.stages["decode"].fit, p.graph_sizes)
            for d, p in self.parallel.items()
            if d in self.degrees
        }
        return ProfileCosts(fits["prefill"], fits["decode"], fits["encode"], self.meta.graph_sizes, parallel)

    def host_costs(self) -> ProfileHostCosts | None:
        """The host CPU's costs around the model (front end, patches), if this profile measured them."""
        from epd.plan.profile.costs import ProfileHostCosts

        if not all(name in self.stages for name in HOST_STAGES):
            return None
        return ProfileHostCosts(self.stages["front_end"].fit, self.stages["patches"].fit)

    def transfer(self, connector: str) -> tuple[float, float]:
        """(latency in seconds, bandwidth in bytes per second) of `connector` on this device."""
        if connector not in self.transfers:
            measured = ", ".join(self.transfers) or "none"
            raise KeyError(f"connector {connector!r} was not profiled (measured: {measured})")
        fit = self.transfers[connector].fit
        per_byte = fit.coefficient("byte")
        return fit.coefficient("latency"), (1.0 / per_byte if per_byte > 0 else float("inf"))

    def to_json(self) -> dict:
        out = {
            "format": FORMAT,
            "meta": asdict(self.meta),
            "stages": {name: stage.to_json() for name, stage in self.stages.items()},
            "transfers": {name: stage.to_json() for name, stage in self.transfers.items()},
        }
        if self.parallel:  # left out at degree 1 only: the file reads as it always did
            out["parallel"] = {str(d): self.parallel[d].to_json() for d in sorted(self.parallel)}
        return out

    @classmethod
    def from_json(cls, data: dict) -> Profile:
        if data.get("format") != FORMAT:
            raise ValueError(f"unsupported profile format {data.get('format')!r} (this epd reads {FORMAT})")
        return cls(
            ProfileMeta.from_json(data["meta"]),
            {name: StageProfile.from_json(s) for name, s in data["stages"].items()},
            {name: StageProfile.from_json(s) for name, s in data.get("transfers", {}).items()},
            {int(d): ParallelProfile.from_json(p) for d, p in data.get("parallel", {}).items()},
        )

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(_dump(self.to_json()) + "\n")


def _dump(value: Any, indent: str = "") -> str:
    """JSON with whatever fits a line on one line (a measurement, a fit's terms): a profile of
    hundreds of shapes stays readable, one shape per line."""
    compact = json.dumps(value)
    if len(indent) + len(compact) <= LINE or not isinstance(value, (dict, list)) or not value:
        return compact
    inner = indent + " "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {_dump(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    return "[\n" + ",\n".join(inner + _dump(v, inner) for v in value) + "\n" + indent + "]"


LINE = 100


def load_profile(path: str | Path) -> Profile:
    """A profile written by `epd profile` (`Profile.save`)."""
    return Profile.from_json(json.loads(Path(path).read_text()))

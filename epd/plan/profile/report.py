"""The fit summary `epd profile` prints: per stage, its coefficients and how well they fit."""

from __future__ import annotations

from epd.plan.profile.store import Profile, StageProfile

# Coefficients are seconds per unit of their term; shown in the unit that reads best.
_UNITS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9), ("ps", 1e-12), ("fs", 1e-15))


def format_report(profile: Profile) -> str:
    meta = profile.meta
    lines = [
        f"profile of {meta.model}",
        f"on {meta.device} ({meta.device_name}), {meta.dtype}, {meta.load_format} weights, "
        f"attention {meta.attention_backend or '-'}, CUDA graphs {list(meta.graph_sizes) or 'none'}, "
        f"measured in {meta.wall_seconds:.1f} s",
        "",
        "| stage | points | rms rel. error | max rel. error | model |",
        "|---|---|---|---|---|",
    ]
    lines += [_stage_row(name, stage) for name, stage in profile.stages.items()]
    for degree in sorted(profile.parallel):
        entry = profile.parallel[degree]
        lines += [_stage_row(f"{name} @tp{degree}", stage) for name, stage in entry.stages.items()]
    lines += [_transfer_row(name, stage, profile) for name, stage in profile.transfers.items()]
    return "\n".join(lines)


def _stage_row(name: str, stage: StageProfile) -> str:
    fit = stage.fit
    model = " + ".join(f"{_seconds(c)} * {term}" for term, c in zip(fit.terms, fit.coefficients) if c > 0)
    if fit.floor > 0:
        model = f"max({_seconds(fit.floor)}, {model or '0'})"
    errors = f"{fit.rms_rel_error:.1%} | {fit.max_rel_error:.1%}"
    return f"| {name} | {fit.num_points} | {errors} | {model or '0'} |"


def _transfer_row(name: str, stage: StageProfile, profile: Profile) -> str:
    latency, bandwidth = profile.transfer(name)
    fit, pair = stage.fit, " -> ".join(stage.devices)
    model = f"{_seconds(latency)} + bytes / ({bandwidth / 1e9:.3g} GB/s)"
    return (
        f"| transfer {name} ({pair}) | {fit.num_points} | {fit.rms_rel_error:.1%} | "
        f"{fit.max_rel_error:.1%} | {model} |"
    )


def _seconds(value: float) -> str:
    for unit, size in _UNITS:
        if value >= size:
            return f"{value / size:.4g} {unit}"
    return f"{value:.3g} s"

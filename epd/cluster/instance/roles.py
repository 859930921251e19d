"""Whether an instance may change its roles now (`SetRoles`): the mechanism's rules, not a policy.

| change                              | allowed when                                              |
|-------------------------------------|-----------------------------------------------------------|
| add or remove P or D                | the instance holds the language model, its engine and     |
|                                     | P and D stages hold no request (the engine is kept)       |
| add or remove E                     | it was started with `switchable_roles` (both parts of the |
|                                     | model in host memory: epd.cluster.instance.host_weights)  |
|                                     | and every stage, the encoder's included, holds nothing    |
| add E, without switchable_roles     | never: the vision tower was not loaded for the language   |
|                                     | model, and an encoder-only instance has no language model |
| remove E, without switchable_roles  | never: it is the embedding path fixed at start (EP, ED, E)|
| anything on an EPD instance         | never: it runs a local connector and cannot send to others|
| no roles at all                     | never                                                     |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from epd.cluster.layout import Role, role_letters


@dataclass(frozen=True)
class Loaded:
    """What an instance loaded at start, which its roles cannot outgrow."""

    language_model: bool
    vision_tower: bool
    local_connector: bool
    host_copy: bool = False  # both parts in host memory (switchable_roles): either can be built


def parse_roles(letters: str) -> frozenset[Role]:
    """Role letters in any order and case ("dp" -> {P, D}); ValueError names a bad letter."""
    try:
        return frozenset(Role(letter) for letter in letters.upper())
    except ValueError:
        raise ValueError(f"unknown role in {letters!r}: roles are E, P, D") from None


def refusal(
    instance_id: str,
    current: frozenset[Role],
    wanted: frozenset[Role],
    loaded: Loaded,
    busy: Mapping[str, int],
) -> str | None:
    """Why `instance_id` cannot go from `current` to `wanted` roles now; None if it can.

    `busy`: requests held per part that the change affects (engine, prefill, decode, encode stages)."""
    change = f"{instance_id} cannot change its roles from {role_letters(current)} to {role_letters(wanted)}"
    if not wanted:
        return f"{change}: an instance needs at least one role"
    if wanted == current:
        return None
    if loaded.local_connector:
        return f"{change}: it runs EPD with a local connector, so it cannot send work to other instances"
    if loaded.host_copy:
        return _still_holds(change, busy)
    if Role.ENCODE in wanted - current:
        held = "the language model only" if loaded.language_model else "nothing to encode with"
        return (
            f"{change}: adding E needs the vision tower, which it did not load (it holds {held}); "
            "start an instance with E instead, or this one with --switchable-roles"
        )
    if Role.ENCODE in current - wanted:
        return (
            f"{change}: removing E is not supported (its embedding path is fixed when it starts, "
            "unless it was started with --switchable-roles)"
        )
    if not loaded.language_model:
        return f"{change}: P and D need the language model, which this encoder-only instance did not load"
    return _still_holds(change, busy)


def _still_holds(change: str, busy: Mapping[str, int]) -> str | None:
    holding = {part: n for part, n in busy.items() if n}
    if holding:
        held = ", ".join(f"{part} holds {n}" for part, n in holding.items())
        return f"{change}: {STILL_HOLDS} ({held}); retry when they are done"
    return None


# The one refusal that passes by itself: what a drained instance still finishes (a KV send not yet
# confirmed, an embedding on its way). The router's switch (epd.cluster.router.role_switch) retries it.
STILL_HOLDS = "it still holds requests"


def only_busy(error: str | None) -> bool:
    """Whether a `SetRolesReply` error refused only because requests are still held: retry later."""
    return error is not None and f": {STILL_HOLDS} (" in error

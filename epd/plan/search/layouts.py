"""The layouts a plan considers: every split of n GPUs into instance groups, one GPU per instance
(or, with tensor-parallel degrees allowed, N GPUs per `@tpN` instance).

An instance holds one of the role sets in `INSTANCE_KINDS`; a layout is how many instances of
each kind, so it is written once, canonically, with its groups in that order (`2E+1EP+1D`, never
`1EP+2E+1D`): the search never simulates the same layout twice. A layout is valid when some
instance encodes, some prefills and some decodes (`Layout.parse`'s rule: a prefill-only instance
then has an encoder to take images from, a decode-only one a prefill to take KV from).

| GPUs | layouts over all six kinds |
|------|----------------------------|
| 1    | 1                          |
| 2    | 9                          |
| 4    | 94                         |
| 8    | 1191                       |

ED (encode and decode without prefill) is left out: nothing would be gained by it that EPD lacks.

Degrees (`epd plan --tp 1,2`): each kind holding P or D may run at one of the allowed degrees, one
degree per kind in a layout (prefill at tp2 and decode at tp1, DistServe's choice, is
`1E+1P@tp2+1D`); encoder-only instances stay at degree 1 (epd.cluster.layout). A layout's GPUs are
then its devices (`Layout.num_devices`), and its groups are ordered by kind, then degree. With
degree 1 only, the layouts (and their order) are those above.
"""

from __future__ import annotations

from collections.abc import Iterator

from epd.cluster.layout import ROLE_ORDER, Layout, Role

# Group order of the canonical text; also the order of `--instance-kinds` choices.
INSTANCE_KINDS = ("E", "EP", "EPD", "P", "PD", "D")


def parse_kinds(text: str) -> tuple[str, ...]:
    """'e,pd,D' -> ('E', 'PD', 'D') in canonical order; ValueError for unknown kinds."""
    given = {kind.strip().upper() for kind in text.split(",") if kind.strip()}
    unknown = given - set(INSTANCE_KINDS)
    if unknown or not given:
        raise ValueError(f"instance kinds are some of {','.join(INSTANCE_KINDS)}, not {text!r}")
    return tuple(kind for kind in INSTANCE_KINDS if kind in given)


Group = tuple[str, int, int]  # (kind, count, degree)


def candidate_layouts(
    num_gpus: int, kinds: tuple[str, ...] = INSTANCE_KINDS, degrees: tuple[int, ...] = (1,)
) -> list[Layout]:
    """Every valid layout of exactly `num_gpus` GPUs of instances of these kinds, each kind at one
    of `degrees` (encoder-only ones at 1), each layout written once."""
    if num_gpus < 1:
        raise ValueError(f"a layout needs at least one GPU, not {num_gpus}")
    if not degrees or min(degrees) < 1:
        raise ValueError(f"tensor-parallel degrees are >= 1, not {degrees}")
    ordered = tuple(kind for kind in INSTANCE_KINDS if kind in kinds)
    every_role = {role.value for role in ROLE_ORDER}
    found = [
        groups
        for groups in _splits(ordered, tuple(sorted(set(degrees))), num_gpus)
        if set("".join(kind for kind, _, _ in groups)) >= every_role
    ]
    # Instance by instance in kind order: with degree 1 only, the order of the combinations of kinds.
    found.sort(key=lambda groups: [(ordered.index(k), d) for k, count, d in groups for _ in range(count)])
    return [Layout.parse("+".join(_group_text(group) for group in groups)) for groups in found]


def _splits(kinds: tuple[str, ...], degrees: tuple[int, ...], gpus: int) -> Iterator[tuple[Group, ...]]:
    """Every way to spend exactly `gpus` GPUs on groups of these kinds, at most one group per kind."""
    if not kinds:
        if gpus == 0:
            yield ()
        return
    kind, rest = kinds[0], kinds[1:]
    yield from _splits(rest, degrees, gpus)  # none of this kind
    for degree in degrees if kind_splits(kind) else (1,):
        for count in range(1, gpus // degree + 1):
            for tail in _splits(rest, degrees, gpus - count * degree):
                yield ((kind, count, degree), *tail)


def kind_splits(kind: str) -> bool:
    """Whether instances of `kind` may be tensor-parallel: they hold the language model (P or D)."""
    return bool(set(kind) & {Role.PREFILL.value, Role.DECODE.value})


def _group_text(group: Group) -> str:
    kind, count, degree = group
    return f"{count}{kind}" + (f"@tp{degree}" if degree > 1 else "")


def capable(layout: Layout, roles: frozenset[Role]) -> int:
    """Instances of `layout` holding at least one of `roles`."""
    return sum(count for count, held in layout.groups if held & roles)

"""The layouts a plan considers: every split of n GPUs into instance groups, one GPU per instance.

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
"""

from __future__ import annotations

from itertools import combinations_with_replacement

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


def candidate_layouts(num_gpus: int, kinds: tuple[str, ...] = INSTANCE_KINDS) -> list[Layout]:
    """Every valid layout of exactly `num_gpus` instances of these kinds, each written once."""
    if num_gpus < 1:
        raise ValueError(f"a layout needs at least one GPU, not {num_gpus}")
    ordered = [kind for kind in INSTANCE_KINDS if kind in kinds]
    layouts = []
    for combo in combinations_with_replacement(ordered, num_gpus):
        if set("".join(combo)) >= {role.value for role in ROLE_ORDER}:
            groups = "+".join(f"{combo.count(kind)}{kind}" for kind in ordered if kind in combo)
            layouts.append(Layout.parse(groups))
    return layouts


def capable(layout: Layout, roles: frozenset[Role]) -> int:
    """Instances of `layout` holding at least one of `roles`."""
    return sum(count for count, held in layout.groups if held & roles)

"""Deployment layouts: which instances run, with which roles, on which devices.

A layout string names instance groups joined by `+`; each group is `<count><roles>` with roles from
E (encode), P (prefill), D (decode):

    1EPD, 4EPD        aggregated: every instance does everything
    2EP+2D            PD disaggregation (encoding stays inside prefill)
    1E+2PD            encoder disaggregation only
    1E+1P+1D          full EPD

Parsing rules (decided here, so every entry point agrees):
- Role letters may come in any order and either case; the canonical text writes them in E, P, D
  order, upper case (`2pe` -> `2EP`). Whitespace around groups is ignored.
- A missing count means 1 (`E+P+D` == `1E+1P+1D`); the canonical text always writes it.
- Groups are kept as written, in order: `1E+1E+1PD` is valid and distinct from `2E+1PD` (the text
  round-trips), though both start the same instances.
- Every role must appear somewhere, no role twice in one group, counts >= 1.
- A group may end in `@label` (`2E@encoders+2P+2D`): with the Ray launcher its instances run only
  on nodes started with `--labels epd-group=<label>`; the local launcher runs everything here.

Devices (`--devices`): a single name (`cpu`, `cuda`, `cuda:1`, ...) is shared by every instance; a
comma-separated list of two or more names gives one device per instance in layout order, and must
name at least as many as there are instances (extra ones stay unused). `cuda` alone means `cuda:0`,
written out so the spec says where an instance actually runs.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace


class Role(str, enum.Enum):
    ENCODE = "E"
    PREFILL = "P"
    DECODE = "D"

    def __str__(self) -> str:
        return self.value


ROLE_ORDER: tuple[Role, ...] = (Role.ENCODE, Role.PREFILL, Role.DECODE)
_ROLE_VERBS = {Role.ENCODE: "encodes", Role.PREFILL: "prefills", Role.DECODE: "decodes"}
_GROUP_RE = re.compile(r"(?P<count>-?\d+)?(?P<roles>[A-Za-z]+)(?:@(?P<label>[A-Za-z0-9_.-]+))?")
_DEVICE_RE = re.compile(r"(?P<type>cpu|mps|cuda|xpu)(?::(?P<index>\d+))?")
_INDEXED_TYPES = ("cuda", "xpu")  # a bare name means device 0 of that type

Group = tuple[int, frozenset[Role]]


def role_letters(roles: frozenset[Role]) -> str:
    """Role letters in canonical E, P, D order: {D, E} -> "ED"."""
    return "".join(r.value for r in ROLE_ORDER if r in roles)


@dataclass(frozen=True)
class InstanceSpec:
    """One instance (one process on one device) of a layout.

    `index` is global in layout order; `role_index` counts instances with the same role set, so
    `name` ("E0", "E1", "PD0", "EPD3") is unique within a layout and says what the instance does
    at start. An instance keeps its name when its roles change (`with_roles`): "P0" may decode.
    """

    index: int
    roles: frozenset[Role]
    device: str
    role_index: int = 0
    fixed_name: str | None = None  # set once the roles no longer match the name
    node_label: str | None = None  # `@label` of its group: which nodes may run it (Ray launcher)

    @property
    def name(self) -> str:
        return self.fixed_name or f"{role_letters(self.roles)}{self.role_index}"

    def has(self, role: Role) -> bool:
        return role in self.roles

    def with_roles(self, roles: frozenset[Role]) -> InstanceSpec:
        """The same instance (same name) holding `roles`."""
        return replace(self, roles=frozenset(roles), fixed_name=self.name)


@dataclass(frozen=True)
class Layout:
    """A parsed layout. Build with `Layout.parse`; `text` is the canonical form of `groups`.

    Direct construction is validated too, so a Layout always satisfies the parsing rules and
    `Layout.parse(layout.text) == layout`.
    """

    text: str
    groups: tuple[Group, ...]
    labels: tuple[str | None, ...] = ()  # per group, its `@label` (or None); () when none has one

    def __post_init__(self) -> None:
        _check_groups(self.groups, self.text)
        if self.labels and len(self.labels) != len(self.groups):
            raise ValueError(f"layout {self.text!r}: {len(self.labels)} labels for {len(self.groups)} groups")
        canonical = _canonical_text(self.groups, self.labels)
        if self.text != canonical:
            raise ValueError(f"layout text {self.text!r} is not the canonical {canonical!r}")

    @classmethod
    def parse(cls, text: str) -> Layout:
        """Parse a layout string by the rules in the module docstring.

        ValueError says what is wrong and how to fix it.
        """
        if not text or not text.strip():
            raise ValueError("empty layout: expected groups like '1EPD', '2EP+2D' or '1E+1P+1D'")
        parsed = [_parse_group(part, i, text) for i, part in enumerate(text.split("+"))]
        groups = tuple(group for group, _ in parsed)
        labels = tuple(label for _, label in parsed) if any(label for _, label in parsed) else ()
        _check_groups(groups, text)
        return cls(_canonical_text(groups, labels), groups, labels)

    @property
    def num_instances(self) -> int:
        return sum(count for count, _ in self.groups)

    @property
    def is_aggregated(self) -> bool:
        """Every instance has every role: nothing is transferred between instances."""
        return all(len(roles) == len(ROLE_ORDER) for _, roles in self.groups)

    def count(self, role: Role) -> int:
        """Number of instances having `role`."""
        return sum(count for count, roles in self.groups if role in roles)

    def instances(self, devices: str | Sequence[str] = "cpu") -> list[InstanceSpec]:
        """The instances in layout order, each with its device (see the module docstring)."""
        device_of = _assign_devices(parse_devices(devices), self.num_instances, self.text)
        specs: list[InstanceSpec] = []
        per_role_set: dict[frozenset[Role], int] = {}
        labels = self.labels or (None,) * len(self.groups)
        for (count, roles), label in zip(self.groups, labels):
            for _ in range(count):
                role_index = per_role_set.get(roles, 0)
                per_role_set[roles] = role_index + 1
                device = device_of[len(specs)]
                specs.append(InstanceSpec(len(specs), roles, device, role_index, node_label=label))
        return specs

    def instances_with(self, role: Role, devices: str | Sequence[str] = "cpu") -> list[InstanceSpec]:
        """The instances having `role`, in layout order."""
        return [spec for spec in self.instances(devices) if spec.has(role)]

    def __str__(self) -> str:
        return self.text


def parse_devices(devices: str | Sequence[str]) -> list[str]:
    """Split and normalise device names: "cuda:0, cuda:1" -> ["cuda:0", "cuda:1"]; "cuda" -> ["cuda:0"].

    A string is split on commas; a sequence is taken item by item. ValueError on an empty list or a
    malformed name. One name means "shared by every instance" to `Layout.instances`.
    """
    names = devices.split(",") if isinstance(devices, str) else list(devices)
    if not names or names == [""]:
        raise ValueError("no devices given: expected 'cpu', 'cuda:0' or a list like 'cuda:0,cuda:1'")
    return [_normalise_device(name) for name in names]


# ---- internals ----------------------------------------------------------------------------------
def _parse_group(part: str, position: int, text: str) -> tuple[Group, str | None]:
    group = part.strip()
    if not group:
        raise ValueError(
            f"layout {text!r}: group {position + 1} is empty (two '+' in a row, or one at an end?)"
        )
    match = _GROUP_RE.fullmatch(group)
    if match is None and group.lstrip("-").isdigit():
        raise ValueError(
            f"layout {text!r}: group {group!r} names no roles; add some of E, P, D, e.g. '{group}EPD'"
        )
    if match is None:
        raise ValueError(f"layout {text!r}: group {group!r} is not <count><roles>, e.g. '2EP' or '1D'")
    count = int(match["count"]) if match["count"] is not None else 1
    if count < 1:
        raise ValueError(f"layout {text!r}: group {group!r} has count {count}; counts must be at least 1")
    return (count, _parse_roles(match["roles"], group, text)), match["label"]


def _parse_roles(letters: str, group: str, text: str) -> frozenset[Role]:
    roles: list[Role] = []
    for letter in letters.upper():
        try:
            role = Role(letter)
        except ValueError:
            raise ValueError(
                f"layout {text!r}: group {group!r} has unknown role {letter!r} (roles are E, P, D)"
            ) from None
        if role in roles:
            raise ValueError(f"layout {text!r}: group {group!r} names {letter} twice")
        roles.append(role)
    return frozenset(roles)


def _check_groups(groups: tuple[Group, ...], text: str) -> None:
    """Rules that hold for the whole layout, also for a directly constructed one."""
    if not groups:
        raise ValueError("empty layout: expected groups like '1EPD', '2EP+2D' or '1E+1P+1D'")
    for count, roles in groups:
        if count < 1 or not roles or not roles <= set(ROLE_ORDER):
            raise ValueError(f"layout {text!r}: bad group ({count}, {set(roles)})")
    present = frozenset().union(*(roles for _, roles in groups))
    for role in ROLE_ORDER:
        if role not in present:
            raise ValueError(f"layout {text!r}: no instance {_ROLE_VERBS[role]}: add {role.value} to a group")


def _canonical_text(groups: tuple[Group, ...], labels: tuple[str | None, ...] = ()) -> str:
    labels = labels or (None,) * len(groups)
    return "+".join(
        f"{count}{role_letters(roles)}" + (f"@{label}" if label else "")
        for (count, roles), label in zip(groups, labels)
    )


def _normalise_device(name: str) -> str:
    device = name.strip()
    match = _DEVICE_RE.fullmatch(device)
    if match is None:
        raise ValueError(f"malformed device {name!r}: expected cpu, mps, cuda, cuda:N, xpu or xpu:N")
    if match["type"] in _INDEXED_TYPES and match["index"] is None:
        return f"{device}:0"
    return device


def _assign_devices(devices: list[str], num_instances: int, text: str) -> list[str]:
    if len(devices) == 1:
        return devices * num_instances
    if len(devices) < num_instances:
        raise ValueError(
            f"layout {text!r} has {num_instances} instances but only {len(devices)} devices were given "
            f"({','.join(devices)}): name one device per instance, or a single device for all"
        )
    return devices[:num_instances]

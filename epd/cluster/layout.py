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
- A group may end in `@tpN` (`1E+1P@tp2+1D`): each of its instances is tensor-parallel over N
  devices (rank 0, the instance process, and N-1 workers: epd.parallel), started by the local
  launcher. A group with P or D splits the language model (its vision tower, for E, is whole on
  rank 0); an E-only group splits the vision tower, every rank encoding each batch together
  (epd.parallel.encoder: lower latency for large images; more E instances give more images/s
  instead). `@tp1` is the default and is not written; with
  a label too, the degree comes first (`2P@tp2@gpu-nodes`), and `tpN` is never a label.

Devices (`--devices`): a single name (`cpu`, `cuda`, `cuda:1`, ...) is shared by every instance; a
comma-separated list of two or more names gives one device per instance in layout order, and must
name at least as many as there are instances (extra ones stay unused). `cuda` alone means `cuda:0`,
written out so the spec says where an instance actually runs. A tensor-parallel instance takes
as many devices as its degree, in order: `1E+1P@tp2+1D` on `cuda:0,cuda:1,cuda:2,cuda:3` puts E0
on cuda:0, P0 on cuda:1 and cuda:2 (rank 0 first), D0 on cuda:3. Its ranks may share a single
CPU, not a single GPU (nccl refuses two ranks on one GPU): name the GPUs.
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
_GROUP_RE = re.compile(r"(?P<count>-?\d+)?(?P<roles>[A-Za-z]+)(?P<suffixes>(?:@[A-Za-z0-9_.-]*)*)")
_DEGREE_RE = re.compile(r"tp(?P<degree>\d+)", re.IGNORECASE)
_DEVICE_RE = re.compile(r"(?P<type>cpu|mps|cuda|xpu)(?::(?P<index>\d+))?")
_INDEXED_TYPES = ("cuda", "xpu")  # a bare name means device 0 of that type

Group = tuple[int, frozenset[Role]]


def role_letters(roles: frozenset[Role]) -> str:
    """Role letters in canonical E, P, D order: {D, E} -> "ED"."""
    return "".join(r.value for r in ROLE_ORDER if r in roles)


@dataclass(frozen=True)
class InstanceSpec:
    """One instance (one process on one device; at `@tpN`, N of each) of a layout.

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
    # `@tpN`: the devices of its tensor-parallel ranks 1..N-1 (`device` is rank 0's); () at degree 1.
    worker_devices: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.fixed_name or f"{role_letters(self.roles)}{self.role_index}"

    @property
    def degree(self) -> int:
        """Its tensor-parallel degree: how many processes (and devices) it runs on."""
        return 1 + len(self.worker_devices)

    @property
    def devices(self) -> tuple[str, ...]:
        """The device of each of its ranks, rank 0 (the instance process) first."""
        return (self.device, *self.worker_devices)

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
    degrees: tuple[int, ...] = ()  # per group, its `@tpN` (1 if none); () when every group has 1

    def __post_init__(self) -> None:
        _check_groups(self.groups, self.text, self.degrees)
        for name, values in (("labels", self.labels), ("degrees", self.degrees)):
            if values and len(values) != len(self.groups):
                raise ValueError(f"layout {self.text!r}: {len(values)} {name} for {len(self.groups)} groups")
        canonical = _canonical_text(self.groups, self.labels, self.degrees)
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
        groups = tuple(group for group, _, _ in parsed)
        labels = tuple(label for _, label, _ in parsed) if any(label for _, label, _ in parsed) else ()
        degrees = tuple(degree for _, _, degree in parsed) if any(d > 1 for _, _, d in parsed) else ()
        _check_groups(groups, text, degrees)
        return cls(_canonical_text(groups, labels, degrees), groups, labels, degrees)

    @property
    def num_instances(self) -> int:
        return sum(count for count, _ in self.groups)

    @property
    def group_degrees(self) -> tuple[int, ...]:
        """Each group's tensor-parallel degree (1 where it names none)."""
        return self.degrees or (1,) * len(self.groups)

    @property
    def num_devices(self) -> int:
        """Devices the layout runs on: one per tensor-parallel rank of every instance."""
        return sum(count * degree for (count, _), degree in zip(self.groups, self.group_degrees))

    @property
    def is_aggregated(self) -> bool:
        """Every instance has every role: nothing is transferred between instances."""
        return all(len(roles) == len(ROLE_ORDER) for _, roles in self.groups)

    def count(self, role: Role) -> int:
        """Number of instances having `role`."""
        return sum(count for count, roles in self.groups if role in roles)

    def instances(self, devices: str | Sequence[str] = "cpu") -> list[InstanceSpec]:
        """The instances in layout order, each with its devices (see the module docstring)."""
        device_of = iter(_assign_devices(parse_devices(devices), self.num_devices, self.text, self.degrees))
        specs: list[InstanceSpec] = []
        per_role_set: dict[frozenset[Role], int] = {}
        labels = self.labels or (None,) * len(self.groups)
        for (count, roles), label, degree in zip(self.groups, labels, self.group_degrees):
            for _ in range(count):
                role_index = per_role_set.get(roles, 0)
                per_role_set[roles] = role_index + 1
                ranks = tuple(next(device_of) for _ in range(degree))
                spec = InstanceSpec(
                    len(specs), roles, ranks[0], role_index, node_label=label, worker_devices=ranks[1:]
                )
                specs.append(spec)
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
def _parse_group(part: str, position: int, text: str) -> tuple[Group, str | None, int]:
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
    label, degree = _parse_suffixes(match["suffixes"], group, text)
    return (count, _parse_roles(match["roles"], group, text)), label, degree


def _parse_suffixes(suffixes: str, group: str, text: str) -> tuple[str | None, int]:
    """A group's `@label` and `@tpN` (either, both, in any order), as (label or None, degree)."""
    label, degree = None, None
    for suffix in suffixes.split("@")[1:]:
        match = _DEGREE_RE.fullmatch(suffix)
        if not suffix:
            raise ValueError(f"layout {text!r}: group {group!r} has an empty '@' suffix")
        if match is None and label is not None:
            raise ValueError(f"layout {text!r}: group {group!r} has two labels ({label!r}, {suffix!r})")
        if match is not None and degree is not None:
            raise ValueError(f"layout {text!r}: group {group!r} names its degree twice")
        if match is None:
            label = suffix
        else:
            degree = int(match["degree"])
    if degree is not None and degree < 1:
        raise ValueError(f"layout {text!r}: group {group!r} has degree {degree}; '@tpN' needs N >= 1")
    return label, degree or 1


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


def _check_groups(groups: tuple[Group, ...], text: str, degrees: tuple[int, ...] = ()) -> None:
    """Rules that hold for the whole layout, also for a directly constructed one."""
    if not groups:
        raise ValueError("empty layout: expected groups like '1EPD', '2EP+2D' or '1E+1P+1D'")
    for (count, roles), degree in zip(groups, degrees or (1,) * len(groups)):
        if count < 1 or not roles or not roles <= set(ROLE_ORDER) or degree < 1:
            raise ValueError(f"layout {text!r}: bad group ({count}, {set(roles)}, degree {degree})")
    present = frozenset().union(*(roles for _, roles in groups))
    for role in ROLE_ORDER:
        if role not in present:
            raise ValueError(f"layout {text!r}: no instance {_ROLE_VERBS[role]}: add {role.value} to a group")


def _canonical_text(
    groups: tuple[Group, ...], labels: tuple[str | None, ...] = (), degrees: tuple[int, ...] = ()
) -> str:
    labels = labels or (None,) * len(groups)
    degrees = degrees or (1,) * len(groups)
    return "+".join(
        f"{count}{role_letters(roles)}"
        + (f"@tp{degree}" if degree > 1 else "")
        + (f"@{label}" if label else "")
        for (count, roles), label, degree in zip(groups, labels, degrees)
    )


def _normalise_device(name: str) -> str:
    device = name.strip()
    match = _DEVICE_RE.fullmatch(device)
    if match is None:
        raise ValueError(f"malformed device {name!r}: expected cpu, mps, cuda, cuda:N, xpu or xpu:N")
    if match["type"] in _INDEXED_TYPES and match["index"] is None:
        return f"{device}:0"
    return device


def _assign_devices(devices: list[str], num_devices: int, text: str, degrees: tuple[int, ...]) -> list[str]:
    """One device per rank of every instance, in layout order (`num_devices` of them)."""
    parallel = any(d > 1 for d in degrees)
    if len(devices) == 1 and parallel and not devices[0].startswith("cpu"):
        raise ValueError(
            f"layout {text!r} has tensor-parallel instances, which need one device per rank, and "
            f"only {devices[0]} was given: name the devices (e.g. cuda:0,cuda:1,...)"
        )
    if len(devices) == 1:
        return devices * num_devices
    if len(devices) < num_devices:
        what = (
            f"needs {num_devices} devices (one per tensor-parallel rank)"
            if parallel
            else (f"has {num_devices} instances")
        )
        raise ValueError(
            f"layout {text!r} {what} but only {len(devices)} devices were given "
            f"({','.join(devices)}): name one device per instance, or a single device for all"
        )
    return devices[:num_devices]

"""Layout strings: parsing, canonical text, instances with roles and devices, and error messages."""

from __future__ import annotations

import re

import pytest

from epd.cluster import InstanceSpec, Layout, Role, parse_devices

E, P, D = Role.ENCODE, Role.PREFILL, Role.DECODE


def roles_of(layout: Layout) -> list[str]:
    return [spec.name for spec in layout.instances()]


# (layout, instance names in order, aggregated?)
EXAMPLES = [
    ("1EPD", ["EPD0"], True),
    ("4EPD", ["EPD0", "EPD1", "EPD2", "EPD3"], True),
    ("2EP+2D", ["EP0", "EP1", "D0", "D1"], False),
    ("1E+2PD", ["E0", "PD0", "PD1"], False),
    ("1E+1P+1D", ["E0", "P0", "D0"], False),
    ("2E+1P+2D", ["E0", "E1", "P0", "D0", "D1"], False),
    ("3E+2P+1D", ["E0", "E1", "E2", "P0", "P1", "D0"], False),
]


@pytest.mark.parametrize("text, names, aggregated", EXAMPLES)
def test_examples_parse(text: str, names: list[str], aggregated: bool) -> None:
    layout = Layout.parse(text)
    assert layout.text == text
    assert roles_of(layout) == names
    assert layout.num_instances == len(names)
    assert layout.is_aggregated == aggregated
    assert Layout.parse(layout.text) == layout
    specs = layout.instances()
    assert [s.index for s in specs] == list(range(len(names)))
    assert all(s.device == "cpu" for s in specs)
    for role in (E, P, D):
        expected = [s for s in specs if role.value in s.name]
        assert layout.instances_with(role) == expected
        assert layout.count(role) == len(expected) > 0


def test_instance_roles_and_devices() -> None:
    layout = Layout.parse("2E+1P+2D")
    specs = layout.instances("cuda:0,cuda:1,cuda:2,cuda:3,cuda:4")
    assert specs[0] == InstanceSpec(0, frozenset({E}), "cuda:0", 0)
    assert specs[1] == InstanceSpec(1, frozenset({E}), "cuda:1", 1)
    assert specs[2] == InstanceSpec(2, frozenset({P}), "cuda:2", 0)
    assert [s.device for s in specs] == [f"cuda:{i}" for i in range(5)]
    assert specs[3].has(D) and not specs[3].has(P)
    pd = Layout.parse("1E+2PD").instances(["cuda:3", "cuda:1", "cuda:2"])
    assert [(s.name, s.device) for s in pd] == [("E0", "cuda:3"), ("PD0", "cuda:1"), ("PD1", "cuda:2")]
    assert pd[1].has(P) and pd[1].has(D) and not pd[1].has(E)


@pytest.mark.parametrize(
    "devices, expected",
    [
        ("cpu", ["cpu"] * 3),
        ("cuda", ["cuda:0"] * 3),  # one bare name: shared, and written out as device 0
        ("cuda:1", ["cuda:1"] * 3),
        (["cpu"], ["cpu"] * 3),
        ("cuda:0, cuda:1 ,cuda:2", ["cuda:0", "cuda:1", "cuda:2"]),
        ("cuda:0,cuda:1,cuda:2,cuda:3", ["cuda:0", "cuda:1", "cuda:2"]),  # extras stay unused
        ("cuda:0,cuda:0,cuda:1", ["cuda:0", "cuda:0", "cuda:1"]),  # sharing a GPU on purpose
    ],
)
def test_device_assignment(devices, expected: list[str]) -> None:
    assert [s.device for s in Layout.parse("1E+1P+1D").instances(devices)] == expected


def test_parse_devices() -> None:
    assert parse_devices("cpu") == ["cpu"]
    assert parse_devices("cuda,xpu:2,mps") == ["cuda:0", "xpu:2", "mps"]
    assert parse_devices(("cuda:7",)) == ["cuda:7"]


def test_canonical_forms() -> None:
    assert Layout.parse("2PE+1d").text == "2EP+1D"
    assert Layout.parse("E+P+D") == Layout.parse("1E+1P+1D")  # a missing count means 1
    assert Layout.parse(" 1E + 2DP ").text == "1E+2PD"
    assert Layout.parse("DPE").text == "1EPD"
    # Groups are kept as written: the same instances, a different (round-tripping) text.
    split, merged = Layout.parse("1E+1E+1PD"), Layout.parse("2E+1PD")
    assert split != merged and Layout.parse(split.text) == split
    assert roles_of(split) == roles_of(merged) == ["E0", "E1", "PD0"]
    assert str(merged) == "2E+1PD" and str(E) == "E"


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty layout"),
        ("   ", "empty layout"),
        ("1E++1PD", "group 2 is empty"),
        ("1EPD+", "group 2 is empty"),
        ("+1EPD", "group 1 is empty"),
        ("1E+1P", "no instance decodes: add D to a group"),
        ("2PD", "no instance encodes: add E to a group"),
        ("1E+1D", "no instance prefills: add P to a group"),
        ("1EE+1PD", "group '1EE' names E twice"),
        ("1EPDP", "names P twice"),
        ("0EPD", "has count 0; counts must be at least 1"),
        ("1E+-1P+1D", "has count -1"),
        ("1EXD", "unknown role 'X' (roles are E, P, D)"),
        ("1E+1P+1G", "unknown role 'G'"),
        ("2", "group '2' names no roles"),
        ("E2+1PD", "group 'E2' is not <count><roles>"),
        ("1E 1PD", "is not <count><roles>"),
        ("1E*2+1PD", "is not <count><roles>"),
    ],
)
def test_layout_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Layout.parse(text)


@pytest.mark.parametrize(
    "devices, message",
    [
        ("cuda:0,cuda:1", "has 3 instances but only 2 devices were given (cuda:0,cuda:1)"),
        ("gpu0", "malformed device 'gpu0'"),
        ("cuda:0,,cuda:1", "malformed device ''"),
        ("cuda:x", "malformed device 'cuda:x'"),
        ("cuda:-1", "malformed device 'cuda:-1'"),
        ("", "no devices given"),
        ([], "no devices given"),
    ],
)
def test_device_errors(devices, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Layout.parse("1E+1P+1D").instances(devices)


def test_direct_construction_is_validated() -> None:
    assert Layout("1E+1PD", ((1, frozenset({E})), (1, frozenset({P, D})))) == Layout.parse("1E+1PD")
    with pytest.raises(ValueError, match="not the canonical '1E\\+1PD'"):
        Layout("1E+1DP", ((1, frozenset({E})), (1, frozenset({P, D}))))
    with pytest.raises(ValueError, match="no instance decodes"):
        Layout("1EP", ((1, frozenset({E, P})),))
    with pytest.raises(ValueError, match="empty layout"):
        Layout("", ())


@pytest.mark.parametrize(
    "text, canonical, degrees",
    [
        ("1EPD@tp2", "1EPD@tp2", {"EPD0": 2}),
        ("1E+1P@tp2+1D", "1E+1P@tp2+1D", {"E0": 1, "P0": 2, "D0": 1}),
        ("1E+1P+1D@tp2", "1E+1P+1D@tp2", {"E0": 1, "P0": 1, "D0": 2}),
        ("1e+2pd@TP4", "1E+2PD@tp4", {"E0": 1, "PD0": 4, "PD1": 4}),
        ("1E+1P@tp1+1D", "1E+1P+1D", {"E0": 1, "P0": 1, "D0": 1}),  # tp1 is the default
        ("2E@enc+1P@gpu@tp2+1D@tp2@gpu", "2E@enc+1P@tp2@gpu+1D@tp2@gpu", {"P0": 2, "D0": 2}),
    ],
)
def test_tensor_parallel_degrees(text: str, canonical: str, degrees: dict[str, int]) -> None:
    layout = Layout.parse(text)
    assert layout.text == canonical and Layout.parse(canonical) == layout
    specs = {s.name: s for s in layout.instances()}
    assert {name: specs[name].degree for name in degrees} == degrees
    assert layout.num_devices == sum(s.degree for s in specs.values())
    assert all(s.devices == ("cpu",) * s.degree for s in specs.values())  # one CPU: shared by every rank
    if "gpu" in text:
        assert specs["P0"].node_label == "gpu" and specs["E0"].node_label == "enc"


def test_tensor_parallel_instances_take_their_devices_in_order() -> None:
    devices = ",".join(f"cuda:{i}" for i in range(5))
    specs = Layout.parse("1E+1P@tp2+1D@tp2").instances(devices)
    assert [(s.name, s.device, s.devices) for s in specs] == [
        ("E0", "cuda:0", ("cuda:0",)),
        ("P0", "cuda:1", ("cuda:1", "cuda:2")),
        ("D0", "cuda:3", ("cuda:3", "cuda:4")),
    ]
    assert specs[0] == InstanceSpec(0, frozenset({E}), "cuda:0", 0)  # degree 1: as before


@pytest.mark.parametrize(
    "text, devices, message",
    [
        ("1EPD@tp0", "cpu", "has degree 0"),
        ("1EPD@tp2@tp4", "cpu", "names its degree twice"),
        ("1EPD@a@b", "cpu", "has two labels ('a', 'b')"),
        ("1EPD@", "cpu", "empty '@' suffix"),
        ("1E+1P@tp2+1D", "cuda:0,cuda:1,cuda:2", "needs 4 devices (one per tensor-parallel rank) but only 3"),
        ("1EPD@tp2", "cuda:1", "need one device per rank, and only cuda:1 was given"),
    ],
)
def test_tensor_parallel_errors(text: str, devices: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Layout.parse(text).instances(devices)

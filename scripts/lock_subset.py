"""Print the pins from requirements/lock.txt that some packages need, dependencies included.

    python scripts/lock_subset.py --python 3.12 fastapi uvicorn pyzmq

The lock records, under each pin, which packages pull it in ("# via"); read backwards that is
the dependency graph, so the closure of the named packages is exact for the locked versions.
Markers are evaluated for the target Python on x86-64 Linux, not for the Python running this.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

LOCK = Path(__file__).parents[1] / "requirements" / "lock.txt"
PIN = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)==(?P<version>\S+)(?:\s*;\s*(?P<marker>.+))?$")
VIA = re.compile(r"^#\s+(?:via\s+)?(?P<parent>[A-Za-z0-9_.\-]+)")


def read_lock(text: str, environment: dict[str, str]) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Pins that apply to `environment`, and each package's locked dependencies."""
    pins: dict[str, str] = {}
    children: dict[str, set[str]] = defaultdict(set)
    current: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        pin = PIN.match(line)
        if pin:
            marker = pin["marker"]
            applies = marker is None or Marker(marker).evaluate(environment)
            current = canonicalize_name(pin["name"]) if applies else None
            if current:
                pins[current] = pin["version"]
            continue
        via = VIA.match(line)
        if current and via and not via["parent"].startswith("-r"):
            children[canonicalize_name(via["parent"])].add(current)
    return pins, children


def closure(roots: list[str], children: dict[str, set[str]], pins: dict[str, str]) -> list[str]:
    seen: set[str] = set()
    todo = [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in pins:
            raise SystemExit(f"{name} is not in {LOCK.name} for this Python")
        seen.add(name)
        todo.extend(children.get(name, ()))
    return sorted(seen)


def environment(python: str) -> dict[str, str]:
    major_minor = ".".join(python.split(".")[:2])
    full = python if python.count(".") == 2 else f"{python}.0"
    return {
        "python_version": major_minor,
        "python_full_version": full,
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "extra": "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default="3.12", help="target Python version (default 3.12)")
    parser.add_argument("packages", nargs="+")
    args = parser.parse_args()
    pins, children = read_lock(LOCK.read_text(), environment(args.python))
    for name in closure(args.packages, children, pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()

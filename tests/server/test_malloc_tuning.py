"""epd.server.malloc_tuning: a large block freed and allocated again reuses the same pages
(no page faults) once the API process has raised glibc's thresholds.

Run in a child process each: the thresholds are process-wide.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

BLOCK_MB, HELD = 15, 4  # four requests' bodies of three 1280x960 PNGs at once
# Rounds of 4 blocks held at once, then freed; prints the page faults of the rounds after the
# first (bytearray(n) writes zeros: it touches every page of its block).
CHILD = f"""
import resource, sys
from epd.server.malloc_tuning import reuse_large_blocks
tuned = reuse_large_blocks(32 << 20, 128 << 20) if sys.argv[1] == "tuned" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def round():
    blocks = [bytearray({BLOCK_MB} << 20) for _ in range({HELD})]
    del blocks
round()
start = faults()
for _ in range(3):
    round()
print(tuned, faults() - start)
"""
PAGES_PER_ROUND = HELD * (BLOCK_MB << 20) // 4096

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)


def _faults_of_reallocations(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned, int(faults)


@glibc_only
def test_a_freed_large_block_is_reused_without_page_faults() -> None:
    tuned, faults = _faults_of_reallocations("tuned")
    assert tuned == "True"
    assert faults < PAGES_PER_ROUND // 4  # the same pages again: no fault for most of them


@glibc_only
def test_glibc_defaults_map_such_a_block_afresh() -> None:
    """What the tuning is for: without it, the block's pages fault in again every time."""
    tuned, faults = _faults_of_reallocations("default")
    assert tuned == "None"
    assert faults >= PAGES_PER_ROUND  # every round faults its pages in again (3 rounds: most)

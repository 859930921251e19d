"""A process's or thread's line of /proc/<pid>/stat (Linux), read by field name.

The second field is the command name in parentheses, which may itself hold spaces and ")": the
fields are those after its last ")". proc(5) numbers them from 1; `stat_fields` starts at field 3
(state), so field n is at index n - 3 (the constants below).
"""

from __future__ import annotations

from pathlib import Path

PPID = 1  # field 4
MINFLT = 7  # field 10: minor page faults
UTIME = 11  # field 14, in clock ticks
STIME = 12  # field 15, in clock ticks
STARTTIME = 19  # field 22: start time, in clock ticks since boot


def stat_fields(path: str | Path) -> list[str]:
    """The fields of a stat file after the command name: field 3 (state) first. OSError if it is
    gone (the process or thread ended)."""
    return Path(path).read_text().rsplit(")", 1)[1].split()

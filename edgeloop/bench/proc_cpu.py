"""CPU time of running processes, read from /proc: how many cores each part of a
benchmarked system used while it ran (Linux only; elsewhere nothing is measured).

On a shared 2-core machine a latency figure means little without what every process
on it demanded: a stage that waits for the CPU shows as latency, not as CPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process `pid` so far, in seconds (its own threads, not
    its children); None when it is gone or /proc is not there.

    Source: proc(5), /proc/<pid>/stat fields 14 (utime) and 15 (stime), in clock ticks.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) is in parentheses and may hold spaces: count from the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state), so utime (14) and stime (15) are fields[11] and [12].
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def snapshot(pids: Mapping[str, int | None]) -> dict[str, float]:
    """`cpu_seconds` of each named process that is running (the others left out)."""
    out: dict[str, float] = {}
    for name, pid in pids.items():
        seconds = cpu_seconds(pid) if pid is not None else None
        if seconds is not None:
            out[name] = seconds
    return out


def cores(
    before: Mapping[str, float], after: Mapping[str, float], wall_s: float
) -> dict[str, float]:
    """Mean cores each process used between two snapshots `wall_s` seconds apart, and
    their sum as "total" (processes in both snapshots only).

    Raises:
        ValueError: `wall_s` not above zero.
    """
    if not wall_s > 0:
        raise ValueError(f"wall_s must be above 0 (got {wall_s!r})")
    used = {k: (after[k] - before[k]) / wall_s for k in before if k in after}
    used["total"] = sum(used.values())
    return used

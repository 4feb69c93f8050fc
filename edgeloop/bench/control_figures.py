"""The figures of the control-plane reaction benchmark (pure; `control_bench.py` measures).

One `Reaction` per repeated run: t0 the change (drift starts, or the worker runs on half
the capacity), the ThresholdUpdate that answered it (its Kafka timestamp and the window it
was decided on, which its version encodes: version = 4 * window_end_ms + rank,
agents/control/threshold.py), and when the last device of the affected cohort applied it.

The target (issue 10, "Benchmarks"): the devices apply the new tau within two windows
plus the downlink's own delivery time, i.e. the decision (t0 -> the update in Kafka) takes
at most two windows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

TARGET_WINDOWS = 2.0


@dataclass(frozen=True, slots=True)
class Reaction:
    """One run's timeline, wall-clock seconds (time.time(); one host, one clock)."""

    scenario: str
    run: int
    t0: float  # the change
    decided: float  # the answering ThresholdUpdate's Kafka timestamp
    applied: float  # the last device of the cohort applied it (or a later version)
    window_end: float  # end of the window the update was decided on
    version: int
    cohort: str
    tau_before: float
    tau_after: float
    reason: str


def window_end_s(version: int) -> float:
    """The end of the window a threshold version was decided on, in seconds."""
    return (version // 4) / 1000.0


def windows_spanned(t0: float, window_end: float, window_s: float) -> int:
    """Windows from the one holding t0 to the one decided on, both counted: 1 when the
    change's own window carried the update (the docs' "counting the change window")."""
    return max(1, math.ceil((window_end - t0) / window_s - 1e-9))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default);
    with a handful of runs p99 is close to the largest. NaN when there are none."""
    if not values:
        return math.nan
    xs = sorted(values)
    rank = (len(xs) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def run_figures(r: Reaction, window_s: float) -> dict[str, Any]:
    """One run's figures: reaction (t0 -> applied), decision (t0 -> update in Kafka),
    delivery (update in Kafka -> last device applied), in seconds and in windows."""
    reaction = r.applied - r.t0
    decision = r.decided - r.t0
    return {
        **asdict(r),
        "reaction_s": reaction,
        "decision_s": decision,
        "delivery_s": r.applied - r.decided,
        "reaction_windows": reaction / window_s,
        "decision_windows": decision / window_s,
        "windows_spanned": windows_spanned(r.t0, r.window_end, window_s),
        "target_met": decision <= TARGET_WINDOWS * window_s,
    }


def summarize(reactions: Sequence[Reaction], window_s: float, *, attempted: int) -> dict[str, Any]:
    """p50/p99 over the runs of one scenario, and whether every run met the target.

    Args:
        reactions: the runs that got an answer.
        window_s: the control window length W.
        attempted: runs tried; a run with no answer in time is missed and fails the target.

    Returns:
        Figures (seconds unless named), `runs` (per-run figures) and `target_met`.
    """
    rows = [run_figures(r, window_s) for r in reactions]

    def pct(key: str, q: float) -> float:
        return percentile([float(row[key]) for row in rows], q)

    return {
        "runs": rows,
        "attempted": attempted,
        "answered": len(rows),
        "reaction_p50_s": pct("reaction_s", 50),
        "reaction_p99_s": pct("reaction_s", 99),
        "decision_p50_s": pct("decision_s", 50),
        "decision_p99_s": pct("decision_s", 99),
        "delivery_p50_s": pct("delivery_s", 50),
        "delivery_p99_s": pct("delivery_s", 99),
        "reaction_p50_windows": pct("reaction_windows", 50),
        "reaction_p99_windows": pct("reaction_windows", 99),
        "windows_spanned_max": max((int(row["windows_spanned"]) for row in rows), default=0),
        "target_windows": TARGET_WINDOWS,
        "target_met": bool(rows)
        and len(rows) == attempted
        and all(row["target_met"] for row in rows),
    }

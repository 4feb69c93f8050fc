"""The figures of `edgeloop bench control` (edgeloop/bench/control_figures.py): what a
reader of the benchmark's table takes from it — reaction p50/p99, the windows a change
took, the downlink's share, and whether the issue's target (two windows plus the
downlink's delivery) was met — computed from scripted run timelines."""

from __future__ import annotations

import math
import subprocess
import sys

from edgeloop.agents.control.threshold import threshold_version
from edgeloop.bench.control_figures import (
    Reaction,
    percentile,
    summarize,
    window_end_s,
    windows_spanned,
)

W = 3.0


def _reaction(run: int, t0: float, window_end: float, decided: float, applied: float) -> Reaction:
    version = threshold_version(round(window_end * 1_000_000), "COHORT")
    return Reaction("drift", run, t0, decided, applied, window_end_s(version), version,
                    "north", 0.8, 0.6, "over budget")  # fmt: skip


def test_window_end_is_read_back_from_the_version_the_controller_derives() -> None:
    version = threshold_version(1_700_000_003_000_000, "COHORT")
    assert window_end_s(version) == 1_700_000_003.0
    assert window_end_s(threshold_version(1_700_000_003_000_000, "DEVICE")) == 1_700_000_003.0


def test_windows_spanned_counts_the_change_window_as_the_first() -> None:
    # Window [0, 3): a change at 1.0 answered on that same window is one window.
    assert windows_spanned(1.0, 3.0, W) == 1
    # ... answered on the next window [3, 6): two windows.
    assert windows_spanned(1.0, 6.0, W) == 2
    assert windows_spanned(2.9, 9.0, W) == 3


def test_percentiles_interpolate_between_ranks_like_numpy() -> None:
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 50) == 3.0
    assert math.isclose(percentile(xs, 99), 4.96)
    assert math.isnan(percentile([], 50))


def test_a_decision_within_two_windows_meets_the_target_whatever_the_downlink_takes() -> None:
    runs = [
        # decided 4.0 s after the change (1.33 windows), the downlink then took 2 s more
        _reaction(0, 100.0, 102.0, 104.0, 106.0),
        # decided at exactly two windows
        _reaction(1, 200.0, 201.0, 206.0, 206.2),
    ]
    got = summarize(runs, W, attempted=2)
    assert got["answered"] == 2
    assert got["target_met"] is True
    assert [r["windows_spanned"] for r in got["runs"]] == [1, 1]
    assert math.isclose(got["reaction_p50_s"], (6.0 + 6.2) / 2)
    assert math.isclose(got["delivery_p99_s"], 0.2 + (2.0 - 0.2) * 0.99)
    assert math.isclose(got["runs"][0]["decision_windows"], 4.0 / 3.0)


def test_a_decision_later_than_two_windows_or_a_missed_run_fails_the_target() -> None:
    slow = summarize([_reaction(0, 100.0, 105.0, 106.5, 106.6)], W, attempted=1)
    assert slow["target_met"] is False
    assert slow["runs"][0]["windows_spanned"] == 2
    missed = summarize([_reaction(0, 100.0, 102.0, 104.0, 104.1)], W, attempted=2)
    assert missed["answered"] == 1
    assert missed["target_met"] is False
    nothing = summarize([], W, attempted=2)
    assert nothing["target_met"] is False
    assert math.isnan(nothing["reaction_p50_s"])


def test_bench_help_lists_the_control_suite() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edgeloop", "bench", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "control" in out

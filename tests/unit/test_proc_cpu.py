"""`edgeloop bench e2e`'s CPU figures (edgeloop/bench/proc_cpu.py): the cores a process
used over a span, read from /proc, as the bench prints them per process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from edgeloop.bench import proc_cpu


def test_a_busy_child_uses_about_one_core_and_an_idle_one_none() -> None:
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"]
    )
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    try:
        time.sleep(0.3)  # past interpreter start-up
        pids = {"busy": busy.pid, "idle": idle.pid}
        before, t0 = proc_cpu.snapshot(pids), time.monotonic()
        time.sleep(1.5)
        after = proc_cpu.snapshot(pids)
        used = proc_cpu.cores(before, after, time.monotonic() - t0)
    finally:
        busy.kill()
        idle.kill()
        busy.wait()
        idle.wait()
    # A shared 2-core machine may give the busy loop less than a whole core, never more.
    assert 0.3 < used["busy"] <= 1.05
    assert used["idle"] < 0.05
    assert used["total"] == pytest.approx(used["busy"] + used["idle"])


def test_a_process_that_is_gone_is_left_out() -> None:
    gone = 2**22 + 12345  # above the largest pid_max Linux allows: no such process
    assert proc_cpu.cpu_seconds(gone) is None
    assert proc_cpu.snapshot({"gone": gone, "me": os.getpid(), "none": None}).keys() == {"me"}


def test_a_span_of_no_time_is_refused() -> None:
    with pytest.raises(ValueError, match="wall_s must be above 0"):
        proc_cpu.cores({}, {}, 0.0)

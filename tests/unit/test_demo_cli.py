"""`edgeloop demo` refuses, before starting anything, what would go wrong later."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path


def demo(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGELOOP_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "edgeloop", "demo", "--headless", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_a_report_folder_that_cannot_be_written_is_named_up_front(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = demo("--home", str(tmp_path / "h"), "--report", str(blocker / "r"), home=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"--report {blocker / 'r'}: cannot write there" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "h" / "run").exists()  # nothing started


def test_a_second_demo_in_the_same_home_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    with (home / ".demo.lock").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 4242")
        lock.flush()
        proc = demo("--home", str(home), home=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f"another edgeloop demo (pid 4242) is running in {home}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (home / "run").exists()

"""`edgeloop fleet register|set-cohort|decommission|list` as an operator runs them: each
write is a DeviceRecord on the compacted fleet topic, `list` shows the latest one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edgeloop.infra.testing import InfraEndpoints
from tests.integration.bridge_support import prepare

pytestmark = pytest.mark.integration


def _fleet(stack: InfraEndpoints, *args: str) -> str:
    env = {**os.environ, "EDGELOOP_HOME": str(stack.home)}
    done = subprocess.run(
        [sys.executable, "-m", "edgeloop", "fleet", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_fleet_commands_write_and_read_device_records(infra_stack: InfraEndpoints) -> None:
    await prepare(infra_stack)
    device = f"fc{infra_stack.kafka.flavor[:1]}-1"
    _fleet(infra_stack, "register", device, "--cohort", "control", "--site", "lab", "--label",
           "row=3")  # fmt: skip
    _fleet(infra_stack, "set-cohort", device, "canary")
    rows = [r for r in _fleet(infra_stack, "list").splitlines() if r.startswith(device + "\t")]
    assert len(rows) == 1
    assert "cohort=canary" in rows[0] and "site=lab" in rows[0] and "labels=row=3" in rows[0]
    _fleet(infra_stack, "decommission", device)
    assert not [r for r in _fleet(infra_stack, "list").splitlines() if r.startswith(device)]
    listed = _fleet(infra_stack, "list", "--all")
    assert f"{device}\tcohort=canary\tdecommissioned" in listed

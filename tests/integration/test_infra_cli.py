"""`edgeloop infra up / status / down` as an operator runs them, in a throwaway home."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import httpx
import orjson
import pytest

from edgeloop.core.settings import KafkaSettings, MqttSettings, RegistrySettings
from edgeloop.infra.kafka import metadata_ok

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The registry is another part of the tree; the round trip covers it once it exists.
HAS_REGISTRY = importlib.util.find_spec("edgeloop.schemas.registry.service") is not None


def edgeloop(home: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
    return subprocess.run(
        [sys.executable, "-m", "edgeloop", "--log-level", "warning", *args],
        env={**env, "EDGELOOP_HOME": str(home), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"


def wait_for(condition: object, what: str, limit_s: float = 90) -> None:
    """Poll a condition another process makes true; the limit only bounds a hang."""
    deadline = time.monotonic() + limit_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.2)


def state(home: Path) -> dict[str, object]:
    doc: dict[str, object] = orjson.loads((home / "infra" / "state.json").read_bytes())
    return doc


def pids(home: Path) -> dict[str, int]:
    return {row["name"]: row["pid"] for row in state(home)["components"]}  # type: ignore[attr-defined, index]


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    yield home
    # Whatever the test did, leave no supervisor behind.
    edgeloop(home, "infra", "down")


async def test_up_status_down_round_trip(home: Path) -> None:
    extra = [] if HAS_REGISTRY else ["--no-registry"]
    up = edgeloop(home, "infra", "up", "--kafka", "tansu", *extra)
    assert up.returncode == 0, up.stdout + up.stderr

    # infra.env is what every other command reads: its endpoints work.
    kafka = KafkaSettings.load(home)
    assert (kafka.flavor, kafka.idempotence) == ("tansu", False)
    assert await metadata_ok(kafka.bootstrap)
    mqtt = MqttSettings.load(home)
    assert mqtt.password is not None
    async with aiomqtt.Client(
        mqtt.host,
        mqtt.port,
        username=mqtt.username,
        password=mqtt.password.get_secret_value(),
        timeout=10,
    ):
        pass
    if HAS_REGISTRY:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{RegistrySettings.load(home).url}/subjects")
        assert response.status_code == 200

    status = edgeloop(home, "infra", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    expected = ["mosquitto", "kafka", *(["registry"] if HAS_REGISTRY else [])]
    rows = [line for line in status.stdout.splitlines() if any(n in line for n in expected)]
    assert all("yes" in line for line in rows), status.stdout
    children = pids(home)
    assert sorted(children) == sorted(expected)
    supervisor = int((home / "infra" / "supervisor.pid").read_text())

    down = edgeloop(home, "infra", "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not alive(supervisor)
    assert not [name for name, pid in children.items() if alive(pid)]
    assert not (home / "infra.env").exists()  # no stale endpoints for later commands
    assert edgeloop(home, "infra", "status").returncode == 1


def test_supervisor_restarts_a_killed_broker(home: Path) -> None:
    up = edgeloop(home, "infra", "up", "--kafka", "tansu", "--no-registry")
    assert up.returncode == 0, up.stdout + up.stderr
    before = pids(home)
    os.kill(before["mosquitto"], signal.SIGKILL)
    wait_for(
        lambda: pids(home)["mosquitto"] != before["mosquitto"] and state(home)["phase"] == "ready",
        "mosquitto to be restarted",
    )
    status = edgeloop(home, "infra", "status")
    assert status.returncode == 0, status.stdout
    assert pids(home)["kafka"] == before["kafka"]  # the others were left alone


def test_up_names_the_component_that_cannot_start(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = edgeloop(home, "infra", "up", "--no-registry", "--mqtt-port", str(port))
    assert up.returncode != 0
    assert "mosquitto" in up.stderr
    assert "Address already in use" in up.stderr
    assert not (home / "infra.env").exists()

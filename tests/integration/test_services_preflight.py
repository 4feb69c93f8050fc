"""`edgeloop bridge` and `edgeloop train serve` refuse to start before their topics exist.

Both embedded brokers (as Kafka by default) auto-create a topic a client asks metadata
for, with the broker's partition count (Tansu 4, our Apache Kafka 1) and `delete`
cleanup: a bridge started before `edgeloop topics create` made edge.inference.v1 with
the broker's count (the agents then refuse to start, or a device's events and its table
state no longer share a partition number) and the compacted downlink topics as plain
ones. Each test gets a broker of its own, without topics; the shared stack gives MQTT and
the registry.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from edgeloop.artifacts import generate_keypair
from edgeloop.infra.kafka import KafkaBroker
from edgeloop.infra.registry_proc import RegistryProcess
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.streams.topic_admin import all_topics, ensure_topics

pytestmark = pytest.mark.integration

# A service that passed its checks runs until stopped: this long means it started.
STARTED_S = 25.0


async def _edgeloop(home: Path, env: dict[str, str], *args: str) -> tuple[int | None, str]:
    """Run the CLI; the exit code, or None when it was still running after STARTED_S."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
    environ.update(env, EDGELOOP_HOME=str(home))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgeloop", "--log-level", "error", *args,
        env=environ, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), STARTED_S)
    except TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
        return None, err.decode()
    return int(proc.returncode or 0), err.decode()


async def _edgeloop_topics(bootstrap: str) -> list[str]:
    """The topics of edgeloop's topic map that exist on the broker."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return sorted(set(await admin.list_topics()) & all_topics().keys())
    finally:
        await admin.close()


def _env(stack: InfraEndpoints, broker: KafkaBroker) -> dict[str, str]:
    # The shared MQTT broker and registry, this test's own Kafka; a share group and
    # client id of its own, so no session of it could take another test's messages.
    unique = uuid.uuid4().hex[:8]
    return stack.env | {
        "EDGELOOP_KAFKA_BOOTSTRAP": broker.bootstrap,
        "EDGELOOP_KAFKA_FLAVOR": broker.flavor,
        "EDGELOOP_KAFKA_IDEMPOTENCE": str(broker.supports_idempotence).lower(),
        "EDGELOOP_BRIDGE_CLIENT_ID": f"preflight-{unique}",
        "EDGELOOP_BRIDGE_SHARE_GROUP": f"preflight-{unique}",
    }


def _one_error(code: int | None, err: str) -> str:
    assert code is not None, f"started (still running after {STARTED_S:g} s): {err}"
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


async def test_a_bridge_started_before_its_topics_exist_creates_none_and_names_topics_create(
    infra_stack: InfraEndpoints,
    kafka_factory: Callable[[str], Awaitable[KafkaBroker]],
    tmp_path: Path,
) -> None:
    """It used to start: the uplink's warm-up had the broker create edge.inference.v1,
    edge.offload.v1 and edge.status.v1, the downlink's consumers the control, release,
    verdict and fleet topics, each with the broker's defaults."""
    broker = await kafka_factory(infra_stack.kafka.flavor)
    code, err = await _edgeloop(tmp_path, _env(infra_stack, broker), "bridge")
    created = await _edgeloop_topics(broker.bootstrap)
    assert not created, f"the broker auto-created {created}"
    error = _one_error(code, err)
    assert "the bridge reads or writes" in error, error
    for topic in ("edge.inference.v1", "edge.uplink.dlq.v1", "control.thresholds.v1"):
        assert topic in error, error
    assert "fleet.devices.v1" in error, error
    assert "`edgeloop topics create`" in error, error


async def test_train_serve_without_the_topics_it_writes_creates_none_and_names_them(
    infra_stack: InfraEndpoints,
    kafka_factory: Callable[[str], Awaitable[KafkaBroker]],
    tmp_path: Path,
) -> None:
    """With only its trigger topic there, it used to start; the first release then had
    the broker create ml.model-releases.v1 (compacted in the topic map) as a plain topic
    with the broker's count, and a bad trigger ml.training-triggers.dlq.v1 likewise."""
    broker = await kafka_factory(infra_stack.kafka.flavor)
    generate_keypair(tmp_path / "keys")
    env = _env(infra_stack, broker)

    # No topic at all: one line, naming every topic it needs.
    code, err = await _edgeloop(tmp_path, env, "train", "serve")
    error = _one_error(code, err)
    assert "`train serve` reads or writes" in error, error
    for topic in ("ml.training-triggers.v1", "ml.training-triggers.dlq.v1", "ml.model-releases.v1"):
        assert topic in error, error
    assert "`edgeloop topics create`" in error, error
    assert not await _edgeloop_topics(broker.bootstrap)

    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("ml.training-triggers.v1", 6, 1)])
    finally:
        await admin.close()
    code, err = await _edgeloop(tmp_path, env, "train", "serve")
    error = _one_error(code, err)
    assert "ml.model-releases.v1" in error and "ml.training-triggers.dlq.v1" in error, error
    assert "ml.training-triggers.v1," not in error, error
    assert await _edgeloop_topics(broker.bootstrap) == ["ml.training-triggers.v1"]


async def test_a_bridge_whose_schemas_are_not_registered_says_to_register_them(
    infra_stack: InfraEndpoints,
    kafka_factory: Callable[[str], Awaitable[KafkaBroker]],
    tmp_path: Path,
) -> None:
    """The bridge does not register schemas (operators do). Started before
    `edgeloop schemas register`, it dead-letters every event as `unregistered_schema`,
    and said so only in an info line ("warm-up incomplete"): a newcomer following the
    README saw nothing. Now a warning names the command."""
    broker = await kafka_factory(infra_stack.kafka.flavor)
    await ensure_topics(broker.bootstrap)
    registry = RegistryProcess(tmp_path / "registry", broker.bootstrap)  # no subjects
    await registry.start()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
    environ.update(
        _env(infra_stack, broker),
        EDGELOOP_HOME=str(tmp_path),
        EDGELOOP_REGISTRY_URL=registry.url,
    )
    log = tmp_path / "bridge.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgeloop", "--log-level", "warning", "bridge",
            "--no-downlink", env=environ, stdout=out, stderr=out,
        )  # fmt: skip
    try:
        async with asyncio.timeout(STARTED_S):
            while "edgeloop schemas register" not in log.read_text():
                assert proc.returncode is None, log.read_text()
                await asyncio.sleep(0.2)
        line = next(x for x in log.read_text().splitlines() if "schemas register" in x)
        assert "level=warning" in line and "dead-letter" in line, line
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await registry.stop()

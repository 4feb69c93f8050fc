"""`edgeloop agents` on a real broker refuses topics of another partition count.

docs/deploy.md has operators run `edgeloop topics create --partitions 12`; a worker left
on the default EDGELOOP_AGENTS_PARTITIONS=6 used to start without a word and create its
changelogs with 6 partitions, so a device's events and its table state no longer shared
a partition number. Each flavour gets a broker of its own: the shared one's topics keep
the count every other test expects.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from edgeloop.infra.kafka import KafkaBroker
from edgeloop.infra.testing import InfraEndpoints

pytestmark = pytest.mark.integration


async def _edgeloop(home: Path, bootstrap: str, *args: str, **env: str) -> tuple[int, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
    environ.update(EDGELOOP_HOME=str(home), EDGELOOP_KAFKA_BOOTSTRAP=bootstrap, **env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgeloop", "--log-level", "error", *args,
        env=environ, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return int(proc.returncode or 0), err.decode()


async def test_a_worker_on_another_partition_count_than_the_topics_does_not_start(
    kafka_factory: Callable[[str], Awaitable[KafkaBroker]], kafka_flavor: str, tmp_path: Path
) -> None:
    broker = await kafka_factory(kafka_flavor)
    code, err = await _edgeloop(
        tmp_path, broker.bootstrap, "topics", "create", "--partitions", "12"
    )
    assert code == 0, err
    code, err = await _edgeloop(tmp_path, broker.bootstrap, "agents", "--no-verdicts")
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "EDGELOOP_AGENTS_PARTITIONS is 6" in errors[0], errors[0]
    assert "edge.inference.v1 has 12 (expected 6)" in errors[0], errors[0]
    assert "set EDGELOOP_AGENTS_PARTITIONS=12" in errors[0], errors[0]
    # Refused before Faust created anything: no changelog of the wrong count exists.
    assert not await _topics(broker.bootstrap, "edgeloop-agents-")


async def test_a_worker_started_before_its_topics_exist_names_topics_create(
    kafka_factory: Callable[[str], Awaitable[KafkaBroker]], kafka_flavor: str, tmp_path: Path
) -> None:
    """It used to start, and its consumer's subscription had the broker auto-create the
    source topics with the broker's partition count (Tansu 4, our Apache Kafka 1), not
    the worker's 6: events and table state on different partition numbers from then on."""
    broker = await kafka_factory(kafka_flavor)
    code, err = await _edgeloop(tmp_path, broker.bootstrap, "agents", "--no-verdicts")
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "do not exist yet" in errors[0] and "edge.inference.v1" in errors[0], errors[0]
    assert "`edgeloop topics create --partitions 6`" in errors[0], errors[0]
    assert not await _topics(broker.bootstrap, "edge."), "the worker created a source topic"


async def _topics(bootstrap: str, prefix: str) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return [t for t in await admin.list_topics() if t.startswith(prefix)]
    finally:
        await admin.close()


async def test_fleet_register_before_the_topics_exist_creates_none_and_names_topics_create(
    infra_stack: InfraEndpoints,
    kafka_factory: Callable[[str], Awaitable[KafkaBroker]],
    tmp_path: Path,
) -> None:
    """It used to succeed, the broker auto-creating fleet.devices.v1 with its defaults
    (1 partition on Apache Kafka, 4 on Tansu; `delete`, not compacted), which
    `topics create` then left as it was without a word."""
    assert infra_stack.registry is not None
    broker = await kafka_factory(infra_stack.kafka.flavor)
    registry = {"EDGELOOP_REGISTRY_URL": infra_stack.registry.url}
    code, err = await _edgeloop(tmp_path, broker.bootstrap, "fleet", "register", "pi-1", **registry)
    assert code == 1, err
    assert "fleet.devices.v1 does not exist" in err and "`edgeloop topics create" in err, err
    assert not await _topics(broker.bootstrap, "fleet."), "the broker auto-created the topic"
    # Listing printed nothing and exited 0 (a fleet gone with Tansu's topics looked empty).
    code, err = await _edgeloop(tmp_path, broker.bootstrap, "fleet", "list", **registry)
    assert code == 1, err
    assert "fleet.devices.v1 does not exist" in err, err

    # A topic made with another count before `topics create` is reported, not skipped.
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("edge.status.v1", 4, 1)])
    finally:
        await admin.close()
    code, err = await _edgeloop(tmp_path, broker.bootstrap, "topics", "create")
    assert code == 0, err
    assert "warning: existing topics with another partition count than 6" in err, err
    assert "edge.status.v1 has 4" in err, err

"""`edgeloop train trigger` and `edgeloop control capacity` against a real broker: each
appends its request to the control log of the agents' app id (EDGELOOP_AGENTS_APP_ID
when no --app-id is given) and prints the offset Kafka gave it, which is where the
record is."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from edgeloop.agents.control_app import control_log
from edgeloop.infra.kafka import KafkaBroker

pytestmark = pytest.mark.integration


def _edgeloop(bootstrap: str, home: str, app_id: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
    env.update(EDGELOOP_HOME=home, EDGELOOP_KAFKA_BOOTSTRAP=bootstrap,
               EDGELOOP_AGENTS_APP_ID=app_id)  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "edgeloop", "--log-level", "error", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def _offset(out: str) -> int:
    """N of "... at offset N;" (train trigger) or "... at offset N)" (control capacity)."""
    found = re.search(r" at offset (\d+)", out)
    assert found is not None, out
    return int(found[1])


async def _records(bootstrap: str, topic: str) -> dict[int, dict[str, object]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        out: dict[int, dict[str, object]] = {}
        while len(out) < end:
            for msgs in (await consumer.getmany(tp, timeout_ms=1000)).values():
                out.update({m.offset: json.loads(m.value) for m in msgs if m.value is not None})
        return out
    finally:
        await consumer.stop()


async def test_requests_land_in_the_agents_log_at_the_offsets_printed(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.bootstrap
    app_id = f"ctl-cli-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        # As the workers create it (one partition, internal to the app).
        await admin.create_topics([NewTopic(control_log(app_id), 1, 1)])
    finally:
        await admin.close()
    home = str(tmp_path)
    first = _edgeloop(bootstrap, home, app_id, "train", "trigger", "--request-id", "r-1")
    cap = _edgeloop(bootstrap, home, app_id, "control", "capacity", "7.5")
    assert f"r-1 appended to {control_log(app_id)} at offset" in first
    records = await _records(bootstrap, control_log(app_id))
    assert records[_offset(first)]["k"] == "manual" and records[_offset(first)]["id"] == "r-1"
    assert records[_offset(cap)] == {**records[_offset(cap)], "k": "cap", "per_s": 7.5}
    assert len(records) == 2


async def test_a_log_no_worker_created_is_refused_and_not_created(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    """A mistyped app id used to print "appended ... at offset 0" and auto-create a log
    no worker reads (with the broker's default partitions: 4 on Tansu, not 1)."""
    bootstrap = kafka_broker.bootstrap
    app_id = f"nobody-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
    env.update(EDGELOOP_HOME=str(tmp_path), EDGELOOP_KAFKA_BOOTSTRAP=bootstrap,
               EDGELOOP_AGENTS_APP_ID=app_id)  # fmt: skip
    for args in (("train", "trigger"), ("control", "capacity", "5")):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "edgeloop", "--log-level", "error", *args],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 1, done.stdout
        assert f"{control_log(app_id)} does not exist" in done.stderr
        assert "Traceback" not in done.stderr
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        assert control_log(app_id) not in await admin.list_topics()
    finally:
        await admin.close()

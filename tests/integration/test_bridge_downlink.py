"""Downlink: Kafka control events reach exactly the devices they are for, over mTLS."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from aiokafka import AIOKafkaProducer

from edgeloop.infra.testing import InfraEndpoints
from edgeloop.schemas import catalog
from edgeloop.schemas.framing import ConfluentCodec, SingleObjectCodec
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topics import subject_for
from tests.integration.bridge_support import BridgeProcess, prepare

pytestmark = pytest.mark.integration


def now_us() -> int:
    return time.time_ns() // 1000


def device_record(device: str, cohort: str) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "ts": now_us(),
        "device_id": device,
        "cohort": cohort,
        "hardware": "raspberrypi5",
        "target": "pi5-cpu",
        "site": "lab",
        "labels": {},
        "registered_at": now_us(),
        "decommissioned": False,
    }


def threshold(device: str, version: int) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "ts": now_us(),
        "scope": "DEVICE",
        "scope_id": device,
        "threshold_version": version,
        "tau": 0.625,
        "confidence_kind": "MAX_PROB",
        "audit_rate": 0.0625,
        "reason": "test",
        "signals": {"offload_rate": 0.25},
    }


def release(cohort: str, version: int) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "ts": now_us(),
        "model_name": "digits-student",
        "model_version": version,
        "cohort": cohort,
        "stage": "CANARY",
        "wave": 0,
        "artifact_url": f"http://127.0.0.1:1/digits-student/{version}",
        "manifest_sha256": "0" * 64,
        "target": "pi5-cpu",
        "parent_version": version - 1,
        "reason": "test",
    }


async def produce(stack: InfraEndpoints, items: list[tuple[str, str, str, dict[str, Any]]]) -> None:
    """(topic, key, event name, record) -> Kafka, Confluent-framed with registered ids."""
    assert stack.registry is not None
    codec = ConfluentCodec()
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka.bootstrap, acks="all")
    await producer.start()
    try:
        async with RegistryClient(stack.registry.url) as registry:
            for topic, key, event, record in items:
                schema = catalog.get(event)
                schema_id = await registry.register(subject_for(topic), schema.text)
                await producer.send_and_wait(
                    topic, codec.encode(schema_id, schema, record), key=key.encode()
                )
    finally:
        await producer.stop()


async def retained(
    stack: InfraEndpoints, device: str, kind: str, wait_s: float = 3.0
) -> list[dict[str, Any]]:
    """What a device with its own certificate receives on its downlink topic."""
    creds = stack.mosquitto.device_credentials(device)
    codec = SingleObjectCodec(catalog.catalog().values())
    got: list[dict[str, Any]] = []
    async with aiomqtt.Client(
        stack.mosquitto.host,
        stack.mosquitto.tls_port,
        identifier=f"{device}-probe-{uuid.uuid4().hex[:4]}",
        tls_context=creds.ssl_context(),
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe(f"edgeloop/{device}/down/{kind}", qos=1)
        try:
            async with asyncio.timeout(wait_s):
                async for message in client.messages:
                    payload = message.payload
                    assert isinstance(payload, bytes)
                    got.append(codec.decode(payload)[1])
        except TimeoutError:
            pass
    return got


async def until(predicate_coro: Any, timeout_s: float = 60) -> Any:
    async with asyncio.timeout(timeout_s):
        while True:
            result = await predicate_coro()
            if result:
                return result
            await asyncio.sleep(0.5)


async def test_threshold_reaches_its_device_only_and_a_cohort_release_every_member(
    infra_stack: InfraEndpoints, bridges: list[BridgeProcess], tmp_path: Path
) -> None:
    await prepare(infra_stack)
    tag = uuid.uuid4().hex[:6]
    canary = [f"c{tag}-{i}" for i in range(3)]
    control = f"k{tag}-0"
    cohort = f"canary-{tag}"
    await produce(
        infra_stack,
        [
            *[("fleet.devices.v1", d, "DeviceRecord", device_record(d, cohort)) for d in canary],
            ("fleet.devices.v1", control, "DeviceRecord", device_record(control, f"control-{tag}")),
        ],
    )
    bridge = BridgeProcess(
        infra_stack.home,
        f"bridge-{tag}",
        tmp_path / "bridge.log",
        EDGELOOP_BRIDGE_DOWNLINK_GROUP=f"downlink-{tag}",
        EDGELOOP_BRIDGE_SHARE_GROUP=tag,
    )
    bridge.downlink = True
    bridges.append(bridge)
    bridge.start()
    await bridge.subscribed()

    await produce(
        infra_stack,
        [
            ("control.thresholds.v1", canary[0], "ThresholdUpdate", threshold(canary[0], 7)),
            ("ml.model-releases.v1", cohort, "ModelRelease", release(cohort, 2)),
        ],
    )

    async def threshold_arrived() -> list[dict[str, Any]]:
        return await retained(infra_stack, canary[0], "threshold")

    got = await until(threshold_arrived)
    assert [t["threshold_version"] for t in got] == [7]
    # Retained and addressed: another device sees no threshold at all.
    assert await retained(infra_stack, canary[1], "threshold") == []
    assert await retained(infra_stack, control, "threshold") == []

    for device in canary:

        async def model_arrived(device: str = device) -> list[dict[str, Any]]:
            return await retained(infra_stack, device, "model")

        releases = await until(model_arrived)
        assert [(r["model_version"], r["cohort"]) for r in releases] == [(2, cohort)]
    assert await retained(infra_stack, control, "model") == []

"""`edgeloop schemas register|check` and the in-process service's metrics, against a real
registry on a real broker."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from edgeloop.core.errors import RegistryError
from edgeloop.infra.kafka import KafkaBroker
from edgeloop.infra.ports import free_ports
from edgeloop.infra.registry_proc import RegistryProcess
from edgeloop.schemas import catalog
from edgeloop.schemas.registry import api
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.registry.service import RegistryService
from edgeloop.schemas.topics import TOPICS, subject_for

# `kafka_broker` (tests/conftest.py) runs each test on Tansu and on Apache Kafka.
pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def own_registry(kafka_broker: KafkaBroker, tmp_path: Path) -> AsyncIterator[RegistryProcess]:
    topic = f"_schemas-{uuid.uuid4().hex[:8]}"
    async with RegistryProcess(tmp_path / "registry", kafka_broker.bootstrap, topic=topic) as proc:
        yield proc


async def edgeloop(url: str, home: Path, *args: str) -> tuple[int, str]:
    env = {**os.environ, "EDGELOOP_REGISTRY_URL": url, "EDGELOOP_HOME": str(home), "COLUMNS": "200"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgeloop",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(120):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


FLEET = [subject_for(s.name) for s in TOPICS.values() if s.fleet]


async def test_register_sets_fleet_compatibility_and_is_idempotent(
    own_registry: RegistryProcess, tmp_path: Path
) -> None:
    code, out = await edgeloop(own_registry.url, tmp_path, "schemas", "register")
    assert code == 0, out
    assert "edge.inference.v1-value" in out
    assert "FULL_TRANSITIVE" in out
    async with RegistryClient(own_registry.url) as client:
        assert sorted(await client.subjects()) == sorted(subject_for(t) for t in TOPICS)
        for subject in FLEET:
            assert await client.compatibility(subject) == "FULL_TRANSITIVE"
        first = {s: (await client.version(s)).id for s in await client.subjects()}
        # The same event schema under two subjects is one schema: one id.
        same = await client.register("scratch.inference-value", catalog.get("InferenceEvent").text)
        assert same == first["edge.inference.v1-value"]
        await client.delete_subject("scratch.inference-value")
        await client.delete_subject("scratch.inference-value", permanent=True)

    code, out = await edgeloop(own_registry.url, tmp_path, "schemas", "register")
    assert code == 0, out
    async with RegistryClient(own_registry.url) as client:
        again = {s: (await client.version(s)).id for s in await client.subjects()}
        assert again == first
        assert [await client.versions(s) for s in again] == [[1]] * len(again)

        # The registry itself now refuses a change that old devices could not read:
        # dropping a field is backward compatible only, and the level is FULL_TRANSITIVE.
        status = json.loads(catalog.schema_text("DeviceStatus"))
        status["fields"] = [f for f in status["fields"] if f["name"] != "seq"]
        with pytest.raises(RegistryError) as refused:
            await client.register("edge.status.v1-value", status)
        assert refused.value.error_code == api.INCOMPATIBLE_SCHEMA
        assert "seq" in str(refused.value)


async def test_check_exits_non_zero_and_names_the_incompatibility(
    own_registry: RegistryProcess, tmp_path: Path
) -> None:
    code, out = await edgeloop(own_registry.url, tmp_path, "schemas", "check")
    assert code == 0, out  # nothing registered yet: nothing to break
    assert (await edgeloop(own_registry.url, tmp_path, "schemas", "register"))[0] == 0
    code, out = await edgeloop(own_registry.url, tmp_path, "schemas", "check")
    assert code == 0, out
    assert "INCOMPATIBLE" not in out

    changed = json.loads(catalog.schema_text("InferenceEvent"))
    changed["fields"].append({"name": "operator_note", "type": "string"})
    avsc = tmp_path / "InferenceEvent.avsc"
    avsc.write_text(json.dumps(changed))
    code, out = await edgeloop(
        own_registry.url,
        tmp_path,
        "schemas",
        "check",
        "--file",
        str(avsc),
        "--subject",
        "edge.inference.v1-value",
    )
    assert code == 1, out
    assert "INCOMPATIBLE" in out
    assert "operator_note" in out
    assert "FULL_TRANSITIVE" in out
    # With a default the same change is fine for old and new readers alike.
    changed["fields"][-1]["default"] = ""
    avsc.write_text(json.dumps(changed))
    code, out = await edgeloop(
        own_registry.url,
        tmp_path,
        "schemas",
        "check",
        "--file",
        str(avsc),
        "--subject",
        "edge.inference.v1-value",
    )
    assert code == 0, out


async def test_service_in_process_serves_metrics_and_stops_on_cancel(
    kafka_broker: KafkaBroker,
) -> None:
    port, metrics_port = free_ports(2)
    service = RegistryService(
        kafka_broker.bootstrap,
        port=port,
        metrics_port=metrics_port,
        topic=f"_schemas-{uuid.uuid4().hex[:8]}",
    )
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(60):
            await service.serving.wait()
        url = f"http://127.0.0.1:{port}"
        async with RegistryClient(url) as client:
            await client.register("m-value", {"type": "record", "name": "M", "fields": []})
            with pytest.raises(RegistryError):
                await client.version("m-value", 5)
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        assert "edgeloop_registry_schemas 1.0" in text
        assert (
            'edgeloop_registry_requests_total{method="POST",route="register",status="200"} 1.0'
        ) in text
        assert 'route="version",status="404"' in text
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/")

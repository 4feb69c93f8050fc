"""The shared `infra_stack` fixture: a home whose infra.env points at live servers."""

from __future__ import annotations

import aiomqtt
import httpx
import pytest

from edgeloop.core.settings import KafkaSettings, MqttSettings, RegistrySettings
from edgeloop.infra.kafka import metadata_ok
from edgeloop.infra.testing import InfraEndpoints, LoopThread

pytestmark = pytest.mark.integration


async def test_settings_loaded_from_the_home_reach_every_server(
    infra_stack: InfraEndpoints,
) -> None:
    kafka = KafkaSettings.load(infra_stack.home)
    assert kafka.flavor == infra_stack.kafka.flavor
    assert kafka.idempotence is infra_stack.kafka.supports_idempotence
    assert await metadata_ok(kafka.bootstrap)

    mqtt = MqttSettings.load(infra_stack.home)
    assert mqtt.password is not None
    async with aiomqtt.Client(
        mqtt.host,
        mqtt.port,
        username=mqtt.username,
        password=mqtt.password.get_secret_value(),
        timeout=10,
    ):
        pass
    creds = infra_stack.pki.device_cert("dev-stack")
    assert creds.ca == mqtt.ca_file
    async with aiomqtt.Client(
        mqtt.host, mqtt.tls_port, tls_context=creds.ssl_context(), timeout=10
    ):
        pass

    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{RegistrySettings.load(infra_stack.home).url}/subjects")
    assert response.status_code == 200


async def test_a_session_server_restarts_from_a_test_loop(
    infra_stack: InfraEndpoints,
    infra_loop: LoopThread,
) -> None:
    registry = infra_stack.registry
    assert registry is not None
    pid = registry.pid
    await infra_loop.call(registry.restart())
    assert registry.pid != pid
    assert await registry.healthy()

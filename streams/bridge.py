"""The bridge service: uplink and downlink (each can be switched off) plus /metrics."""

from __future__ import annotations

import asyncio
import gc

from edgeloop.core.metrics import serve_metrics
from edgeloop.core.runner import Service, run_services
from edgeloop.core.settings import KafkaSettings, MqttSettings, RegistrySettings
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.streams import downlink, uplink
from edgeloop.streams.downlink import Downlink
from edgeloop.streams.metrics import BridgeMetrics
from edgeloop.streams.settings import BridgeSettings
from edgeloop.streams.uplink import Uplink


def bridge_topics(settings: BridgeSettings) -> set[str]:
    """Every topic the bridge reads or writes with `settings` (only the uplink's or the
    downlink's when the other is off): `edgeloop bridge` refuses to start before they
    exist, since the uplink's warm-up and the downlink's consumers would otherwise have
    the broker auto-create them with its own defaults."""
    topics: set[str] = set()
    if settings.uplink:
        topics |= uplink.WRITES
    if settings.downlink:
        topics |= downlink.READS | downlink.WRITES
    return topics


class _MetricsEndpoint:
    name = "bridge-metrics"

    def __init__(self, metrics: BridgeMetrics, port: int) -> None:
        self.metrics = metrics
        self.port = port

    async def run(self) -> None:
        async with serve_metrics(self.metrics.registry, port=self.port):
            await asyncio.Event().wait()


async def run_bridge(
    settings: BridgeSettings,
    mqtt: MqttSettings,
    kafka: KafkaSettings,
    registry_settings: RegistrySettings,
    metrics: BridgeMetrics | None = None,
) -> None:
    metrics = metrics or BridgeMetrics()
    # Everything imported so far lives for the whole run: keep it out of the collector's
    # full passes, which otherwise stall the loop for tens of ms under load.
    gc.freeze()
    async with RegistryClient.from_settings(registry_settings) as registry:
        services: list[Service] = []
        if settings.uplink:
            services.append(Uplink(settings, mqtt, kafka, registry, metrics))
        if settings.downlink:
            services.append(Downlink(settings, mqtt, kafka, registry, metrics))
        if settings.metrics_port is not None:
            services.append(_MetricsEndpoint(metrics, settings.metrics_port))
        await run_services(services)

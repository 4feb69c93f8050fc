"""`edgeloop bridge`: the MQTT ⇄ Kafka bridge."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from edgeloop.core.settings import KafkaSettings, MqttSettings, RegistrySettings


@click.command()
@click.option("--uplink/--no-uplink", default=None, help="MQTT → Kafka (default on).")
@click.option("--downlink/--no-downlink", default=None, help="Kafka → MQTT (default on).")
@click.option(
    "--client-id",
    help="Stable MQTT client id of this process; each bridge process "
    "needs its own. [env EDGELOOP_BRIDGE_CLIENT_ID]",
)
@click.option(
    "--receive-maximum",
    type=int,
    help="In-flight window: unacknowledged QoS 1 messages the broker may send.",
)
@click.option(
    "--validation",
    type=click.Choice(["full", "header"]),
    help="full (default): decode every body with the strict decoder, so values the Avro "
    "spec forbids and timestamps outside the window (EDGELOOP_BRIDGE_MIN_TIMESTAMP_US / "
    "EDGELOOP_BRIDGE_MAX_TIMESTAMP_US) are dead-lettered; header: check the single-object "
    "header and fingerprint only (faster, but forbidden values then reach Kafka).",
)
@click.option(
    "--intake",
    type=click.Choice(["native", "paho"]),
    help="MQTT receive path: native (asyncio MQTT 5, fast; default) or paho (paho-mqtt on "
    "its own thread).",
)
@click.option("--metrics-port", type=int, help="Serve Prometheus /metrics on this port.")
def bridge(**options: Any) -> None:
    """Move device events from MQTT into Kafka, and control events from Kafka back to the
    devices. Endpoints come from $EDGELOOP_HOME/infra.env and EDGELOOP_* variables; each
    option also reads EDGELOOP_BRIDGE_<OPTION>.

    An MQTT message is acknowledged only after Kafka acknowledged its record (acks=all), so
    a crash loses nothing: the broker redelivers to this client id. Bad input goes to a
    dead-letter topic with its reason. Run more processes (distinct --client-id) to share
    the load through the MQTT shared subscription.
    """
    from edgeloop.streams.bridge import run_bridge
    from edgeloop.streams.settings import BridgeSettings

    overrides = {k: v for k, v in options.items() if v is not None}
    settings = BridgeSettings.load(**overrides)
    asyncio.run(
        run_bridge(settings, MqttSettings.load(), KafkaSettings.load(), RegistrySettings.load())
    )


@click.group()
def topics() -> None:
    """Kafka topics of the topic map."""


@topics.command("create")
@click.option("--partitions", default=6, show_default=True)
@click.option("--replication", default=1, show_default=True)
def create(partitions: int, replication: int) -> None:
    """Create every missing topic (compacted where the map says so)."""
    from edgeloop.streams.topic_admin import ensure_topics

    created = asyncio.run(ensure_topics(KafkaSettings.load().bootstrap, partitions, replication))
    click.echo(f"created {len(created)} topics" + (f": {', '.join(created)}" if created else ""))

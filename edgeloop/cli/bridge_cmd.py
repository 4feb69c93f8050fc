"""`edgeloop bridge`: the MQTT ⇄ Kafka bridge."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import click

from edgeloop.cli.fixes import reachable
from edgeloop.cli.options import load_settings
from edgeloop.core.settings import KafkaSettings, MqttSettings, RegistrySettings, edgeloop_home
from edgeloop.streams.settings import BridgeSettings


def _default(name: str) -> str:
    """The shown default of an option: BridgeSettings' own, which applies when neither the
    option nor its EDGELOOP_BRIDGE_* variable is given (click's default stays None, so
    the variable is not overridden)."""
    return str(BridgeSettings.model_fields[name].default)


@click.command()
@click.option("--uplink/--no-uplink", default=None, help="MQTT → Kafka (default on).")
@click.option("--downlink/--no-downlink", default=None, help="Kafka → MQTT (default on).")
@click.option(
    "--client-id",
    help="Stable MQTT client id of this process; each bridge process "
    "needs its own. Its session (1 h) keeps its share of the shared subscription while it "
    "is stopped: do not start a bridge with a throwaway id, and restart a stopped one "
    "with the same id. [env EDGELOOP_BRIDGE_CLIENT_ID]",
    show_default=_default("client_id"),
)
@click.option(
    "--receive-maximum",
    type=int,
    help="MQTT 5 Receive Maximum: unacknowledged QoS 1 messages the broker may send "
    "(Mosquitto 2.0.11 exceeds it on a backlog; see docs/architecture.md).",
    show_default=_default("receive_maximum"),
)
@click.option(
    "--validation",
    type=click.Choice(["full", "header"]),
    help="full (default): decode every body with the strict decoder, so values the Avro "
    "spec forbids and timestamps outside the window (EDGELOOP_BRIDGE_MIN_TIMESTAMP_US / "
    "EDGELOOP_BRIDGE_MAX_TIMESTAMP_US) are dead-lettered; header: check the single-object "
    "header and fingerprint only (faster, but forbidden values then reach Kafka).",
    show_default=_default("validation"),
)
@click.option(
    "--intake",
    type=click.Choice(["native", "paho"]),
    help="MQTT receive path: native (asyncio MQTT 5, fast) or paho (paho-mqtt on its own thread).",
    show_default=_default("intake"),
)
@click.option(
    "--metrics-port",
    type=int,
    help="Serve Prometheus /metrics on this port.",
    show_default="off",
)
def bridge(**options: Any) -> None:
    """Move device events from MQTT into Kafka, and control events from Kafka back to the
    devices. Endpoints come from $EDGELOOP_HOME/infra.env and EDGELOOP_* variables; each
    option also reads EDGELOOP_BRIDGE_<OPTION>.

    An MQTT message is acknowledged only after Kafka acknowledged its record (acks=all), so
    a crash loses nothing: the broker redelivers to this client id. Bad input goes to a
    dead-letter topic with its reason. Run more processes (distinct --client-id) to share
    the load through the MQTT shared subscription.
    """
    from edgeloop.cli.fixes import require_kafka_answering
    from edgeloop.schemas.topics import check_topics_exist
    from edgeloop.streams.bridge import bridge_topics, run_bridge

    overrides = {k: v for k, v in options.items() if v is not None}
    settings = load_settings(BridgeSettings, **overrides)
    if not settings.uplink and not settings.downlink:
        # It used to exit 0 at once without a word.
        raise click.UsageError(
            "both the uplink and the downlink are off (--no-uplink/--no-downlink or "
            "EDGELOOP_BRIDGE_UPLINK/EDGELOOP_BRIDGE_DOWNLINK=false): nothing to run; keep "
            "at least one on"
        )
    home = edgeloop_home()
    mqtt, kafka = MqttSettings.load(home), KafkaSettings.load(home)
    with reachable(home, kafka=kafka.bootstrap, mqtt=(mqtt.host, mqtt.port), registry=True):
        # MQTT first, as the bridge itself would fail: with the whole stack down, the
        # line names the MQTT broker (and `infra up`), as it did before the topic check.
        _require_listening(mqtt.host, mqtt.port)
        # The uplink's warm-up and the downlink's consumers ask for their topics' metadata:
        # a missing topic would be auto-created by the broker with its own partition
        # count (the agents' co-partitioning broken) and `delete` cleanup (the compacted
        # fleet, threshold and release topics). Metadata of all topics creates none.
        existing = require_kafka_answering(kafka.bootstrap, home)
        check_topics_exist(bridge_topics(settings), existing, who="the bridge reads or writes")
        asyncio.run(run_bridge(settings, mqtt, kafka, RegistrySettings.load(home)))


def _require_listening(host: str, port: int) -> None:
    """A TCP connection to `host:port`; a failure is raised as the ConnectionError that
    `reachable` names (a timeout, say, is an OSError that is not one)."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionError:
        raise
    except OSError as exc:
        raise ConnectionError(f"{host}:{port}: {exc}") from exc


@click.group()
def topics() -> None:
    """Kafka topics of the topic map."""


@topics.command("create")
@click.option("--partitions", default=6, show_default=True)
@click.option("--replication", default=1, show_default=True)
def create(partitions: int, replication: int) -> None:
    """Create every missing topic (compacted where the map says so)."""
    from edgeloop.cli.fixes import require_kafka_answering
    from edgeloop.streams.topic_admin import all_topics, ensure_topics

    home = edgeloop_home()
    bootstrap = KafkaSettings.load().bootstrap
    with reachable(home, kafka=bootstrap):
        created = asyncio.run(ensure_topics(bootstrap, partitions, replication))
    click.echo(f"created {len(created)} topics" + (f": {', '.join(created)}" if created else ""))
    # Existing topics are left alone; one with another count (auto-created by a client
    # that ran first, or made by hand) would be refused by the agents later: say it now.
    counts = require_kafka_answering(bootstrap, home)
    other = {t: counts[t] for t in all_topics() if t in counts and counts[t] != partitions}
    if other:
        listed = ", ".join(f"{t} has {n}" for t, n in sorted(other.items()))
        click.secho(
            f"warning: existing topics with another partition count than {partitions}, "
            f"left as they are: {listed}; the agents need one count for the topics they "
            f"read (EDGELOOP_AGENTS_PARTITIONS): re-create these or pass their count",
            fg="yellow",
            err=True,
        )

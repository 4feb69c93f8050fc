"""`edgeloop registry`: run the embedded schema registry until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio

import click

from edgeloop.cli.fixes import reachable
from edgeloop.core.runner import run_services
from edgeloop.core.settings import KafkaSettings, edgeloop_home

# aiohttp and aiokafka (the cloud extra) load only when this subcommand runs: the CLI
# group imports this module lazily.
from edgeloop.schemas.registry.service import RegistryService


@click.command()
@click.option(
    "--bootstrap",
    default=None,
    metavar="HOST:PORT",
    help="Kafka bootstrap servers [default: EDGELOOP_KAFKA_BOOTSTRAP or infra.env]",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8081, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--topic",
    default="_schemas",
    show_default=True,
    help="Compacted topic holding the registry's state (created if missing).",
)
@click.option(
    "--metrics-port",
    default=None,
    type=click.IntRange(0, 65535),
    help="Serve Prometheus /metrics on this port (0 picks a free one).",
)
@click.option(
    "--timeout",
    "timeout_s",
    default=10.0,
    show_default=True,
    type=float,
    help="Seconds a Kafka read or write may take before a request fails.",
)
def registry(
    *,
    bootstrap: str | None,
    host: str,
    port: int,
    topic: str,
    metrics_port: int | None,
    timeout_s: float,
) -> None:
    """Run the embedded Confluent-compatible schema registry.

    Several instances on the same topic share schemas and ids; the topic is the arbiter.
    """
    servers = bootstrap or KafkaSettings.load().bootstrap
    service = RegistryService(
        servers, host=host, port=port, topic=topic, metrics_port=metrics_port, timeout_s=timeout_s
    )
    with reachable(edgeloop_home(), kafka=servers):
        asyncio.run(run_services([service]))

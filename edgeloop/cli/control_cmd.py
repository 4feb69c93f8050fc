"""`edgeloop control`: the control plane's state (thresholds, signals, triggers, releases)."""

from __future__ import annotations

import asyncio

import click

from edgeloop.core.settings import KafkaSettings, RegistrySettings, edgeloop_home


@click.group()
def control() -> None:
    """The control plane run by `edgeloop agents`."""


@control.command()
@click.option(
    "--model",
    default="digits-student",
    show_default=True,
    help="The model whose training triggers count.",
)
@click.option(
    "--signal-tail",
    default=2000,
    show_default=True,
    help="StreamSignals read per partition from the end.",
)
def status(model: str, signal_tail: int) -> None:
    """Per cohort: tau, threshold version, audit rate, offloads/s of the last window
    against the cloud budget, confidence PSI and release stage; and the hard examples no
    training trigger has covered yet. Read from the compacted and signal topics."""
    from edgeloop.agents.control_status import read_status, render
    from edgeloop.cli.fixes import reachable

    bootstrap = KafkaSettings.load().bootstrap
    with reachable(edgeloop_home(), kafka=bootstrap, registry=True):
        view = asyncio.run(read_status(bootstrap, RegistrySettings.load().url, model, signal_tail))
    click.echo(render(view))

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


@control.command()
@click.argument("per_s", type=float, required=False)
@click.option("--clear", is_flag=True, help="Return to the workers' setting.")
@click.option(
    "--app-id",
    default="edgeloop-agents",
    show_default=True,
    help="The agents' app id (their control log is <app-id>-control-log).",
)
def capacity(per_s: float | None, clear: bool, app_id: str) -> None:
    """Set the cloud capacity PER_S (offloads/s the teacher sustains) the threshold
    controller budgets with, at runtime: appended to the control log, kept in the control
    state (a replay restores it) and used from the next window end, until another value
    or --clear. No worker restart. `edgeloop control status` shows the capacity in force."""
    from edgeloop.agents.context import now_us
    from edgeloop.agents.control_app import append_to_log
    from edgeloop.agents.control_stage import capacity as capacity_obs
    from edgeloop.cli.fixes import reachable
    from edgeloop.core.errors import ConfigError

    if clear == (per_s is not None):
        raise ConfigError("give either PER_S (offloads/s) or --clear")
    try:
        obs = capacity_obs(None if clear else per_s, now_us())
    except ValueError as exc:
        raise ConfigError(f"PER_S: {exc}") from exc
    bootstrap = KafkaSettings.load().bootstrap
    with reachable(edgeloop_home(), kafka=bootstrap):
        asyncio.run(append_to_log(bootstrap, app_id, obs))
    what = "the workers' setting" if clear else f"{per_s:g} offloads/s"
    click.echo(f"cloud capacity: {what} from the next window end (app {app_id})")

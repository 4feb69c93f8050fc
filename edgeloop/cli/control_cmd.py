"""`edgeloop control`: the control plane's state (thresholds, signals, triggers, releases)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import click

from edgeloop.cli.options import load_settings
from edgeloop.core.settings import KafkaSettings, RegistrySettings, edgeloop_home

APP_ID_HELP = (
    "The agents' app id (their control log is <app-id>-control-log). "
    "[env EDGELOOP_AGENTS_APP_ID; default edgeloop-agents]"
)


def agents_app_id(app_id: str | None) -> str:
    """The app id an operator's command writes to: the option, else the agents' own
    setting (EDGELOOP_AGENTS_APP_ID), so it reaches the log the workers read.

    Raises:
        ConfigError, ValidationError: the agents' settings do not load (before any network).
    """
    from edgeloop.agents.settings import AgentsSettings

    overrides = {} if app_id is None else {"app_id": app_id}
    return str(load_settings(AgentsSettings, **overrides).app_id)


class CapacityValue(click.ParamType):
    """PER_S of `control capacity`: a positive, finite number of offloads/s.

    The command passes unknown options through as arguments (so `-1` reaches here instead
    of click's "no such option: -1"); a value that is not a number and starts with `-` is
    reported as the option it looks like.
    """

    name = "offloads/s"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        """The value as a float.

        Raises:
            click.BadParameter: not a positive finite number (names the value).
            click.NoSuchOption: not a number, and spelled as an option (`--bogus`).
        """
        if isinstance(value, float):
            per_s = value
        else:
            try:
                per_s = float(value)
            except ValueError:
                if str(value).startswith("-"):
                    raise click.NoSuchOption(str(value), ctx=ctx) from None
                per_s = math.nan
        from edgeloop.agents.control_stage import MIN_CAPACITY_PER_S

        if not (math.isfinite(per_s) and per_s >= MIN_CAPACITY_PER_S):
            self.fail(
                f"{value!r}: the capacity must be a positive number of offloads/s, at "
                f"least {MIN_CAPACITY_PER_S:g} (--clear returns to the workers' setting)",
                param,
                ctx,
            )
        return per_s


@click.group()
def control() -> None:
    """The control plane run by `edgeloop agents`."""


@control.command()
@click.option(
    "--model",
    default=None,
    help="The model whose training triggers count. "
    "[env EDGELOOP_CONTROL_WIRING__MODEL_NAME; default digits-student]",
)
@click.option(
    "--signal-tail",
    default=2000,
    show_default=True,
    help="StreamSignals read per partition from the end.",
)
def status(model: str | None, signal_tail: int) -> None:
    """Per cohort: tau, threshold version, audit rate, offloads/s of the last window
    against the cloud budget, confidence PSI and release stage; and the hard examples no
    training trigger has covered yet. Read from the compacted and signal topics."""
    from edgeloop.agents.control.settings import ControlSettings
    from edgeloop.agents.control_status import read_status, render
    from edgeloop.cli.fixes import reachable

    # Every setting first: a bad one fails here, before any network.
    model = model or ControlSettings.load().wiring.model_name
    bootstrap, registry = KafkaSettings.load().bootstrap, RegistrySettings.load().url
    with reachable(edgeloop_home(), kafka=bootstrap, registry=True):
        view = asyncio.run(read_status(bootstrap, registry, model, signal_tail))
    click.echo(render(view))


# ignore_unknown_options: `capacity -1` reaches CapacityValue (and gets its message)
# instead of failing as an unknown option `-1`.
@control.command(context_settings={"ignore_unknown_options": True})
@click.argument("per_s", type=CapacityValue(), required=False)
@click.option("--clear", is_flag=True, help="Return to the workers' setting.")
@click.option("--app-id", default=None, help=APP_ID_HELP)
def capacity(per_s: float | None, clear: bool, app_id: str | None) -> None:
    """Set the cloud capacity PER_S (offloads/s the teacher sustains) the threshold
    controller budgets with, at runtime: appended to the control log, kept in the control
    state (a replay restores it) and used from the next window end, until another value
    or --clear. No worker restart. `edgeloop control status` shows the capacity in force.

    PER_S may exceed the setting EDGELOOP_CONTROL_THRESHOLD__CLOUD_CAPACITY_PER_S (a
    teacher node added): it is used as given, with a warning on stderr naming both."""
    from edgeloop.agents.context import now_us
    from edgeloop.agents.control.settings import ControlSettings
    from edgeloop.agents.control_app import append_to_log, control_log
    from edgeloop.agents.control_stage import capacity as capacity_obs
    from edgeloop.cli.fixes import reachable
    from edgeloop.core.errors import ConfigError

    if clear == (per_s is not None):
        raise ConfigError("give either PER_S (offloads/s) or --clear")
    # Every setting first: a bad one fails here, before any network.
    app_id = agents_app_id(app_id)
    ceiling = ControlSettings.load().threshold.cloud_capacity_per_s
    bootstrap = KafkaSettings.load().bootstrap
    obs = capacity_obs(None if clear else per_s, now_us())
    if per_s is not None and per_s > ceiling:
        # Not clamped: the override exists to tell the controller what the setting does
        # not know yet (a teacher node added); the setting is this shell's, which the
        # workers' may differ from.
        click.echo(
            f"warning: {per_s:g} offloads/s is above cloud_capacity_per_s {ceiling:g} "
            "(EDGELOOP_CONTROL_THRESHOLD__CLOUD_CAPACITY_PER_S); the controller uses "
            f"{per_s:g}: the teacher must sustain it",
            err=True,
        )
    with reachable(edgeloop_home(), kafka=bootstrap):
        offset = asyncio.run(append_to_log(bootstrap, app_id, obs))
    what = "the workers' setting" if clear else f"{per_s:g} offloads/s"
    click.echo(
        f"cloud capacity: {what} from the next window end (appended to "
        f"{control_log(app_id)} at offset {offset})"
    )

"""Entry point of the `edgeloop` command."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import click
from pydantic import ValidationError
from pydantic_settings import SettingsError

from edgeloop import __version__
from edgeloop.cli.lazy import LazyGroup
from edgeloop.core.errors import EdgeloopError
from edgeloop.core.logs import setup_logging
from edgeloop.core.settings import variable_for

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "infra": (
        "edgeloop.cli.infra_cmd:infra",
        "Start, stop and inspect the embedded infrastructure.",
    ),
    "registry": ("edgeloop.cli.registry_cmd:registry", "Run the embedded schema registry service."),
    "schemas": ("edgeloop.cli.schemas_cmd:schemas", "Register and check the event schemas."),
    "demo": ("edgeloop.cli.demo_cmd:demo", "Bring everything up on this host and show its state."),
    "bench": ("edgeloop.cli.bench_cmd:bench", "Run benchmarks; print a table and write JSON."),
    "bridge": ("edgeloop.cli.bridge_cmd:bridge", "Run the MQTT <-> Kafka bridge."),
    "agents": (
        "edgeloop.cli.agents_cmd:agents",
        "Run a Faust stream worker: enrich, dedupe, verdicts, hard examples.",
    ),
    "fleet": ("edgeloop.cli.agents_cmd:fleet", "Register devices, list them, set cohorts."),
    "control": (
        "edgeloop.cli.control_cmd:control",
        "The control plane's state: thresholds, signals, triggers per cohort.",
    ),
    "topics": ("edgeloop.cli.bridge_cmd:topics", "Create the Kafka topics of the topic map."),
    "models": (
        "edgeloop.cli.models_cmd:models",
        "Bootstrap, verify and release (FULL, CANARY) model artifacts.",
    ),
    "keys": ("edgeloop.cli.keys_cmd:keys", "Create the release signing key pair."),
    "edge": ("edgeloop.cli.edge_cmd:edge", "Run a device daemon or a simulated fleet."),
    "train": (
        "edgeloop.cli.train_cmd:train",
        "Retrain on hard examples under torchrun; gate; release.",
    ),
}


@click.group(
    cls=LazyGroup,
    lazy=SUBCOMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="edgeloop")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-format",
    default="kv",
    show_default=True,
    type=click.Choice(["kv", "json"]),
    help="kv: one key=value line per event; json: one JSON object per line.",
)
def cli(log_level: str, log_format: str) -> None:
    """edgeloop closes the loop between a fleet of edge inference devices and a GPU
    training cluster: devices stream Avro events over MQTT, a bridge moves them into
    Kafka, agents mine hard examples and tune offload thresholds, a trainer retrains
    and releases signed models.

    State (endpoints, certificates, logs) lives in $EDGELOOP_HOME, default ./.edgeloop.
    """
    setup_logging(log_level, log_format)


def main() -> None:
    try:
        # Without standalone mode click returns a command's `ctx.exit(n)` code instead.
        code = cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except EdgeloopError as exc:
        # Expected failures print one clear line, not a traceback.
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
    except ValidationError as exc:
        # A setting (environment, infra.env) that does not validate: name each field and
        # the value given, as a CLI option's error does.
        click.secho(f"error: invalid settings ({exc.title}):", fg="red", err=True)
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            # The variable the user sets (or infra.env holds), then the field it fills.
            variable = variable_for(exc.title, err["loc"])
            where = f"{variable} ({field})" if variable else field
            click.secho(
                f"  {where}: {_message(err)} (got {err.get('input')!r})", fg="red", err=True
            )
        sys.exit(1)
    except SettingsError as exc:
        # A nested setting's value that is not JSON (EDGELOOP_CONTROL_JUDGE__WAVE_SHARES=
        # [0.5,nan]): pydantic-settings names the field and the source, not the value.
        click.secho(f"error: invalid settings: {exc}{_nested_hint(str(exc))}", fg="red", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _message(err: Any) -> str:
    """pydantic's message without the "Value error, " it puts before a validator's own."""
    return str(err["msg"]).removeprefix("Value error, ")


def _nested_hint(message: str) -> str:
    """The variables behind pydantic-settings' "error parsing value for field "judge"",
    with their values, and the format such a value takes."""
    found = re.search(r'field "(\w+)"', message)
    if found is None:
        return ""
    part = found.group(1).upper()
    given = sorted(
        f"{name}={value!r}"
        for name, value in os.environ.items()
        if name.startswith("EDGELOOP_") and (f"_{part}__" in name or name.endswith(f"_{part}"))
    )
    where = f" ({', '.join(given)})" if given else ""
    return f"{where}; a list or object value of a nested setting takes JSON, e.g. [0.1,0.5]"

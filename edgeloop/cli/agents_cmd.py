"""`edgeloop agents` (the Faust stream worker) and `edgeloop fleet` (the fleet table)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import click

from edgeloop.cli.options import load_settings
from edgeloop.core.settings import KafkaSettings, RegistrySettings, edgeloop_home


@click.command()
@click.option(
    "--workers-web-port",
    "web_port",
    type=int,
    help="Port of the worker's web server (/metrics, Faust's pages); each worker on a host "
    "needs its own. [env EDGELOOP_AGENTS_WEB_PORT; default 6066]",
)
@click.option("--app-id", help="Faust app id = consumer group. [env EDGELOOP_AGENTS_APP_ID]")
@click.option(
    "--verdicts/--no-verdicts",
    default=None,
    help="Run the teacher stage (needs a teacher release in the store; default on). "
    "[env EDGELOOP_AGENTS_VERDICTS]",
)
@click.option(
    "--store",
    help="Artifact store (directory or URL) holding the teacher. [env EDGELOOP_AGENTS_STORE; "
    "default $EDGELOOP_HOME/trainer/store]",
)
@click.option(
    "--public-key",
    type=click.Path(dir_okay=False),
    help="Release public key the teacher must verify against. [env EDGELOOP_AGENTS_PUBLIC_KEY; "
    "default $EDGELOOP_HOME/keys/release.pub]",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Faust's data folder. [env EDGELOOP_AGENTS_DATA_DIR; default $EDGELOOP_HOME/agents]",
)
def agents(**options: Any) -> None:
    """Run one Faust worker: fleet table and enrichment, dedupe, cloud verdicts, the
    hard-example router and the control plane (signals, thresholds, training triggers;
    settings EDGELOOP_CONTROL_<PART>__<NAME>). Run more (distinct --workers-web-port) to
    split the partitions; a stopped or killed worker's partitions and table state move to
    the others.

    Before it joins Kafka the worker checks what it needs: the release key and a teacher
    in the store (verdicts on), a Kafka broker that answers, and the topics it reads,
    created by `edgeloop topics create --partitions N` with N equal to
    EDGELOOP_AGENTS_PARTITIONS (default 6).

    Endpoints come from $EDGELOOP_HOME/infra.env and EDGELOOP_* variables; every setting
    also reads EDGELOOP_AGENTS_<NAME>, one per field of agents/settings.py.
    """

    from edgeloop.agents.app import make_app
    from edgeloop.agents.control.settings import ControlSettings
    from edgeloop.agents.settings import AgentsSettings

    home = edgeloop_home()
    overrides = {k: v for k, v in options.items() if v is not None}
    settings = load_settings(AgentsSettings, **overrides)
    # Paths not set anywhere default to this home's layout (not the working directory's).
    unset = AgentsSettings.model_fields.keys() - settings.model_fields_set
    defaults = {
        "store": str(home / "trainer" / "store"),
        "public_key": home / "keys" / "release.pub",
        "data_dir": home / "agents",
    }
    settings = settings.model_copy(update={k: v for k, v in defaults.items() if k in unset})
    from edgeloop.agents.preflight import (
        check_local,
        check_partitions,
        check_sources_exist,
        check_teacher,
        declared_partitions,
        source_topics,
    )
    from edgeloop.cli.fixes import require_kafka_answering

    # Every setting is loaded (validated) before any network: a bad EDGELOOP_CONTROL_*
    # used to be reported only once Kafka answered. Then what would otherwise fail only
    # inside the running worker (agents/preflight.py): a broker that does not speak
    # Kafka, topics with another partition count, a teacher that is missing.
    kafka, registry, control = KafkaSettings.load(), RegistrySettings.load(), ControlSettings.load()
    check_local(settings)
    check_teacher(settings)
    topics = require_kafka_answering(kafka.bootstrap, home)
    app = make_app(settings, kafka, registry, control=control)
    check_sources_exist(source_topics(app), topics, settings.partitions)
    check_partitions(declared_partitions(app), topics, settings)
    # uvloop: the worker spends most of its time in the event loop's own machinery
    # (Faust schedules several callbacks per event).
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # Faust owns the loop and the signals; our logging setup stays in place.
    from edgeloop.agents.bounded_stop import BoundedStopWorker

    worker = BoundedStopWorker(
        app,
        stop_timeout_s=settings.stop_timeout_s,
        loglevel="info",
        quiet=True,
        override_logging=False,
        redirect_stdouts=False,
    )
    # What is alive now (imports, the app, its settings) lives for the whole run: kept
    # out of the collector's passes. And a young-generation pass every 50,000 container
    # allocations instead of every 700: the worker allocates several short-lived objects
    # per event (Faust's events, aiokafka's futures), most freed by reference counting,
    # and the default threshold ran a collection every few events' worth of batch
    # (about 1,500 passes, 7% of the CPU, in a 100k-event `edgeloop bench agents` drain;
    # with these thresholds 2-3 passes). Full passes stay: every 20 x 10 young ones.
    gc.collect()  # start-up garbage is not frozen for good
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)
    worker.execute_from_commandline()


@click.group()
def fleet() -> None:
    """Fleet metadata: DeviceRecords on the compacted fleet.devices.v1."""


def _run(coro_fn: Any) -> Any:
    from edgeloop.agents.fleet import FleetClient
    from edgeloop.cli.fixes import reachable, require_kafka_answering
    from edgeloop.schemas.registry.client import RegistryClient

    home = edgeloop_home()
    kafka, registry_settings = KafkaSettings.load(home), RegistrySettings.load(home)
    # A port that accepts TCP but is not Kafka made aiokafka wait 40 s before failing.
    require_kafka_answering(kafka.bootstrap, home)

    async def main() -> Any:
        async with RegistryClient.from_settings(registry_settings) as registry:
            return await coro_fn(FleetClient(kafka, registry))

    with reachable(home, kafka=kafka.bootstrap, registry=True):
        return asyncio.run(main())


def _topic_level(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A device or cohort id: the bridge publishes to topics named by them, so each must be
    one MQTT topic level (schemas.topics.level_problem); refused before any network."""
    from edgeloop.schemas.topics import level_problem

    problem = level_problem(value)
    if problem is not None:
        raise click.BadParameter(f"{value!r} {problem}: it cannot be an MQTT topic level")
    return value


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--label")
        out[key] = value
    return out


@fleet.command()
@click.argument("device_id", callback=_topic_level)
@click.option(
    "--cohort",
    default="default",
    show_default=True,
    callback=_topic_level,
    help="The cohort the device belongs to: thresholds and releases are per cohort.",
)
@click.option("--hardware", default="raspberrypi5", show_default=True)
@click.option("--target", default="pi5-cpu", show_default=True)
@click.option("--site", default="", show_default=True)
@click.option("--label", "labels", multiple=True, help="KEY=VALUE (repeatable).")
def register(device_id: str, labels: tuple[str, ...], **fields: str) -> None:
    """Add DEVICE_ID to the fleet (or replace its record)."""
    from edgeloop.agents.fleet import new_record

    record = new_record(
        device_id,
        cohort=fields["cohort"],
        hardware=fields["hardware"],
        target=fields["target"],
        site=fields["site"],
        labels=_labels(labels),
    )
    _run(lambda client: client.write(record))
    click.echo(f"registered {device_id} in cohort {fields['cohort']}")


@fleet.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include decommissioned devices.")
def list_(show_all: bool) -> None:
    """Every device's latest record."""
    devices = _run(lambda client: client.read())
    for device_id in sorted(devices):
        rec = devices[device_id]
        if rec["decommissioned"] and not show_all:
            continue
        state = "decommissioned" if rec["decommissioned"] else "active"
        labels = ",".join(f"{k}={v}" for k, v in sorted(rec["labels"].items()))
        click.echo(
            f"{device_id}\tcohort={rec['cohort']}\t{state}\thardware={rec['hardware']}\t"
            f"target={rec['target']}\tsite={rec['site']}\tlabels={labels}"
        )


async def _update(client: Any, device_id: str, **changes: Any) -> None:
    from edgeloop.agents.fleet import new_record
    from edgeloop.core.errors import ConfigError

    current = (await client.read()).get(device_id)
    if current is None:
        raise ConfigError(f"device {device_id!r} is not in the fleet: `edgeloop fleet register`")
    fields: dict[str, Any] = {
        k: current[k] for k in ("cohort", "hardware", "target", "site", "labels", "decommissioned")
    }
    fields.update(changes)
    record = new_record(device_id, registered_at=current["registered_at"], **fields)
    await client.write(record)


@fleet.command("set-cohort")
@click.argument("device_id", callback=_topic_level)
@click.argument("cohort", callback=_topic_level)
def set_cohort(device_id: str, cohort: str) -> None:
    """Move DEVICE_ID to COHORT."""
    _run(lambda client: _update(client, device_id, cohort=cohort))
    click.echo(f"{device_id} is now in cohort {cohort}")


@fleet.command()
@click.argument("device_id")
def decommission(device_id: str) -> None:
    """Mark DEVICE_ID as having left the fleet (its record stays, flagged)."""
    _run(lambda client: _update(client, device_id, decommissioned=True))
    click.echo(f"{device_id} decommissioned")

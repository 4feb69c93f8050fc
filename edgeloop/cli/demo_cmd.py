"""`edgeloop demo`: the whole closed loop on this host, scripted, watched and reported."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from edgeloop.core.settings import edgeloop_home


def _cohorts(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(c.strip() for c in value.split(",") if c.strip())
    if len(names) < 2 or len(set(names)) != len(names):
        raise click.BadParameter(f"{value!r}: give at least two distinct, comma-separated names")
    return names


def _check_writable(folder: Path, option: str) -> None:
    """Fail before anything starts when the report cannot be written there."""
    from edgeloop.core.folders import write_problem

    problem = write_problem(folder)
    if problem is not None:
        raise click.UsageError(f"{option} {folder}: cannot write there ({problem})")


@contextlib.contextmanager
def _demo_lock(home: Path) -> Iterator[None]:
    """One demo per home: a second would wipe the first's run and share its model cache."""
    home.mkdir(parents=True, exist_ok=True)
    with (home / ".demo.lock").open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise click.ClickException(
                f"another edgeloop demo ({holder}) is running in {home}; wait for it, stop "
                "it (Ctrl-C), or pass --home DIR for a separate one"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        yield


@click.command()
@click.option(
    "--kafka",
    type=click.Choice(["tansu", "apache"]),
    default="tansu",
    show_default=True,
    help="Kafka broker the embedded stack runs.",
)
@click.option(
    "--devices",
    "-n",
    type=click.IntRange(2, 500),
    default=24,
    show_default=True,
    help="Simulated devices (one process, each its own MQTT client and outbox).",
)
@click.option(
    "--cohorts",
    default="north,south,east",
    show_default=True,
    callback=_cohorts,
    help="Comma-separated cohorts; device i is in cohort i mod N.",
)
@click.option("--drifted", default=None, help="The cohort whose inputs drift [the second].")
@click.option(
    "--drift-severity",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.6,
    show_default=True,
    help="0..1: rotation, blur, contrast and noise of the drift.",
)
@click.option(
    "--cloud-capacity",
    type=click.FloatRange(0, min_open=True),
    default=30.0,
    show_default=True,
    help="Offloads/s the cloud teacher may take (the budget).",
)
@click.option(
    "--rate",
    type=click.FloatRange(0, min_open=True),
    default=5.0,
    show_default=True,
    help="Frames per second per device.",
)
@click.option(
    "--window",
    type=click.FloatRange(1),
    default=5.0,
    show_default=True,
    help="Signal window, seconds (the controller and judge act per window).",
)
@click.option(
    "--steady",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="Seconds of steady state before the drift starts.",
)
@click.option(
    "--measure",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="Seconds observed after the retrained model is FULL.",
)
@click.option(
    "--trigger-hard-examples",
    type=click.IntRange(10),
    default=500,
    show_default=True,
    help="Hard examples that trigger a retrain.",
)
@click.option(
    "--epochs", type=click.IntRange(1), default=10, show_default=True, help="Epochs of the retrain."
)
@click.option(
    "--workers",
    type=click.IntRange(1, 4),
    default=1,
    show_default=True,
    help="Agents worker processes (one app; they split the partitions).",
)
@click.option(
    "--bad-release/--no-bad-release",
    default=True,
    show_default=True,
    help="After the retrain, release a deliberately bad model (operator override) "
    "and watch the judge roll it back.",
)
@click.option(
    "--phase-timeout",
    type=click.FloatRange(10),
    default=300.0,
    show_default=True,
    help="Longest wait for one phase; a phase that times out is reported as not "
    "reached and the demo winds down.",
)
@click.option("--headless", is_flag=True, help="No live dashboard: one line per phase.")
@click.option(
    "--report",
    "report_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Report folder [<home>/report].",
)
@click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The demo's state: cached v1 models and this run [$EDGELOOP_HOME/demo].",
)
def demo(**o: Any) -> None:
    """Run the whole loop on this host and show it live.

    Brings up the embedded stack (Mosquitto with mTLS, a Kafka broker, the schema
    registry), bootstraps v1 models once (cached in the demo's home), releases v1 to every
    cohort, then runs the bridge, the agents worker(s), `train serve` and a simulated
    fleet as supervised child processes (logs in <home>/run/logs) through a script:
    steady state, drift in one cohort, thresholds react, hard examples accumulate, a
    retrain triggers, DDP training, canary, waves, FULL; then a deliberately bad release
    (signed, pushed past the gate with `edgeloop models release --override-gate`, which
    is logged) that the rollout judge rolls back.

    At the end the fleet delivers its outboxes, every event is counted in Kafka, all
    processes stop, and a report (report.json, PNG plots, report.md with each release's
    lineage) is written. Ctrl-C stops everything in order. A run takes about 6-10 minutes
    on a 2-core machine (plus the one-time bootstrap).
    """
    from edgeloop.demo.scenario import DemoOptions, run_scenario
    from edgeloop.demo.supervisor import DemoError

    base: Path = o["home"] or edgeloop_home() / "demo"
    cohorts: tuple[str, ...] = o["cohorts"]
    report_dir: Path | None = o["report_dir"]
    try:
        options = DemoOptions(
            home=base.resolve(), kafka=o["kafka"], devices=o["devices"], cohorts=cohorts,
            drifted=o["drifted"] or cohorts[1], drift_severity=o["drift_severity"],
            cloud_capacity_per_s=o["cloud_capacity"], rate_hz=o["rate"], window_s=o["window"],
            steady_s=o["steady"], measure_s=o["measure"],
            trigger_hard_examples=o["trigger_hard_examples"], epochs=o["epochs"],
            workers=o["workers"], bad_release=o["bad_release"],
            phase_timeout_s=o["phase_timeout"], headless=o["headless"],
            report_dir=report_dir.resolve() if report_dir else None,
        )  # fmt: skip
    except DemoError as exc:
        raise click.UsageError(str(exc)) from None
    _check_writable(options.reports, "--report")
    say: Any = click.echo
    console: Any = None
    if not options.headless:
        import logging

        from rich.console import Console

        console = Console()
        say = console.print
        # The dashboard is the view; the services' own logs are in <home>/run/logs.
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    with _demo_lock(options.home):
        try:
            report = asyncio.run(run_scenario(options, say=say, console=console))
        except KeyboardInterrupt:
            click.echo("interrupted: every process was stopped (no report was written)", err=True)
            raise SystemExit(130) from None
    outcome = report.get("scenario", {}).get("outcome", {}) if isinstance(report, dict) else {}
    click.echo(f"\nreport: {options.reports}/report.md")
    click.echo(json.dumps({k: outcome.get(k) for k in (
        "released_version", "release_stage", "bad_version", "rolled_back")}))  # fmt: skip

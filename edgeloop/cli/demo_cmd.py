"""`edgeloop demo`: everything on this host, on embedded defaults."""

from __future__ import annotations

import subprocess
import sys

import click


def _step(title: str, *args: str) -> None:
    click.secho(f"==> {title}", bold=True)
    proc = subprocess.run([sys.executable, "-m", "edgeloop", *args], check=False)
    if proc.returncode != 0:
        raise click.ClickException(
            f"`edgeloop {' '.join(args)}` failed (exit {proc.returncode}); see the output above"
        )


@click.command()
@click.option(
    "--kafka",
    type=click.Choice(["tansu", "apache"]),
    default="tansu",
    show_default=True,
    help="Kafka broker to run.",
)
def demo(kafka: str) -> None:
    """Start the embedded stack (Mosquitto with mTLS, a Kafka broker, the schema registry),
    create the topics, register every event schema, and show the state of each piece.

    The stack keeps running in the background; stop it with `edgeloop infra down`.
    """
    _step(f"starting the embedded stack (Kafka: {kafka})", "infra", "up", "--kafka", kafka)
    _step("creating the Kafka topics", "topics", "create")
    _step("registering the event schemas", "schemas", "register")
    _step("state", "infra", "status")
    click.echo(
        "\nThe stack runs in the background. Next:\n"
        "  edgeloop bridge          # move device events into Kafka\n"
        "  edgeloop infra logs      # each component's log\n"
        "  edgeloop infra down      # stop everything"
    )

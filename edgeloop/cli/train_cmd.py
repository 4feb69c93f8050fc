"""`edgeloop train`: retrain from hard examples under torchrun, gate, sign, release."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgeloop.artifacts.signing import (
    PRIVATE_KEY_NAME,
    PUBLIC_KEY_NAME,
    load_private_key,
    load_public_key,
)
from edgeloop.core.errors import ConfigError
from edgeloop.core.settings import edgeloop_home

# Exit code when the gate refuses the candidate: distinct from errors (1) for schedulers.
GATE_REFUSED_EXIT = 3


def _home(out: Path | None) -> Path:
    return out or edgeloop_home() / "trainer"


@click.group()
def train() -> None:
    """Retrain the edge model on hard examples (DDP under torchrun) and release it."""


@train.command()
@click.option(
    "--hard-examples",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    required=True,
    help=".npz with x, label (teacher's), reason.",
)
@click.option("--trigger-id", required=True, help="TrainingTrigger id (lineage, run dir name).")
@click.option(
    "--offsets",
    default=None,
    help='JSON {"topic/partition": [first, last]} the examples came from.',
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Trainer home [$EDGELOOP_HOME/trainer].",
)
@click.option(
    "--nproc",
    default=1,
    show_default=True,
    help="Processes under torchrun (one per GPU; CPU processes without CUDA).",
)
@click.option("--threads", default=1, show_default=True, help="CPU threads per process.")
@click.option("--epochs", default=15, show_default=True)
@click.option("--seed", default=0, show_default=True)
def run(
    *,
    hard_examples: Path,
    trigger_id: str,
    offsets: str | None,
    out: Path | None,
    nproc: int,
    threads: int,
    epochs: int,
    seed: int,
) -> None:
    """Fine-tune the serving student with distillation from the teacher, then gate it."""
    from edgeloop.trainer.home import TrainerHome
    from edgeloop.trainer.retrain import RetrainRequest, retrain

    try:
        ranges = json.loads(offsets) if offsets else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--offsets is not JSON: {exc}") from exc
    keys = edgeloop_home() / "keys"
    report = retrain(
        TrainerHome(_home(out)),
        load_private_key(keys / PRIVATE_KEY_NAME),
        load_public_key(keys / PUBLIC_KEY_NAME),
        RetrainRequest(
            hard_examples=hard_examples,
            trigger_id=trigger_id,
            offset_ranges=ranges,
            seed=seed,
            epochs=epochs,
            nproc=nproc,
            threads=threads,
        ),
        progress=lambda step: click.echo(f"- {step}"),
    )
    chosen = report["candidate"]["chosen"]
    scores = next(v["scores"] for v in report["candidate"]["variants"] if v["mode"] == chosen)
    click.echo(f"serving v{report['parent_version']}: {report['serving']}")
    click.echo(f"candidate int8-{chosen}: {scores}")
    if report["refused"]:
        click.secho("gate refused:\n  " + "\n  ".join(report["refused"]), fg="red", err=True)
        raise SystemExit(GATE_REFUSED_EXIT)
    click.echo(f"released {report['released_version']}")


@train.command("mine")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Trainer home [$EDGELOOP_HOME/trainer].",
)
@click.option("--hard-out", type=click.Path(path_type=Path), required=True)
@click.option("--seed", default=0, show_default=True)
def mine(out: Path | None, hard_out: Path, seed: int) -> None:
    """Simulate the field: mine hard examples from drifted data with the serving models."""
    from edgeloop.trainer.field import mine_field_pool
    from edgeloop.trainer.home import TrainerHome

    click.echo(json.dumps(mine_field_pool(TrainerHome(_home(out)), hard_out, seed=seed)))

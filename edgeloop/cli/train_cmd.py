"""`edgeloop train`: retrain from hard examples under torchrun, gate, sign, release."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from edgeloop.artifacts.signing import (
    PRIVATE_KEY_NAME,
    PUBLIC_KEY_NAME,
    load_private_key,
    load_public_key,
)
from edgeloop.cli.fixes import reachable, require_key
from edgeloop.cli.options import load_settings
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
        load_private_key(require_key(keys / PRIVATE_KEY_NAME, "set EDGELOOP_HOME")),
        load_public_key(require_key(keys / PUBLIC_KEY_NAME, "set EDGELOOP_HOME")),
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


@train.command("serve")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Trainer home [$EDGELOOP_HOME/trainer]. [env EDGELOOP_TRAINER_HOME]",
)
@click.option("--epochs", type=int, help="Epochs per retrain. [env EDGELOOP_TRAINER_EPOCHS]")
@click.option(
    "--nproc", type=int, help="Processes under torchrun (one per GPU). [env EDGELOOP_TRAINER_NPROC]"
)
@click.option("--threads", type=int, help="CPU threads per process. [env EDGELOOP_TRAINER_THREADS]")
@click.option(
    "--canary-cohort",
    help="Cohort a release goes to first. [env EDGELOOP_TRAINER_CANARY_COHORT; default canary]",
)
@click.option(
    "--artifact-base-url",
    help="Where devices download artifacts (the served store). "
    "[env EDGELOOP_TRAINER_ARTIFACT_BASE_URL]",
)
@click.option(
    "--metrics-port",
    type=int,
    help="Serve Prometheus /metrics on this port. [env EDGELOOP_TRAINER_METRICS_PORT]",
)
def serve(**options: Any) -> None:
    """Consume training triggers: read exactly the hard-example offset ranges each names,
    retrain, gate, sign and publish a ModelRelease (canary cohort first).

    Each trigger id is handled at most once, across restarts too (a ledger in the trainer
    home, then the offset commit). A bad trigger becomes a DeadLetter on
    ml.training-triggers.dlq.v1 with its reason; the service keeps running. Endpoints come
    from $EDGELOOP_HOME/infra.env; every option also reads EDGELOOP_TRAINER_<OPTION>.
    """
    import asyncio

    from edgeloop.cli.fixes import require_kafka_answering
    from edgeloop.core.runner import run_services
    from edgeloop.core.settings import KafkaSettings, RegistrySettings
    from edgeloop.schemas.registry.client import RegistryClient
    from edgeloop.schemas.topics import check_topics_exist
    from edgeloop.trainer.home import TrainerHome
    from edgeloop.trainer.serve_settings import TrainerServeSettings
    from edgeloop.trainer.trigger_consumer import TriggerConsumer, serve_topics

    overrides = {k: v for k, v in options.items() if v is not None}
    if "out" in overrides:
        overrides["home"] = overrides.pop("out")
    settings = load_settings(TrainerServeSettings, **overrides)
    home = settings.home or _home(None)
    keys = settings.keys_dir or edgeloop_home() / "keys"
    for name in (PRIVATE_KEY_NAME, PUBLIC_KEY_NAME):
        require_key(keys / name, "set EDGELOOP_TRAINER_KEYS_DIR")
    kafka, registry_settings = KafkaSettings.load(), RegistrySettings.load()
    # Before any client of ours asks for one of its topics: a missing one would be
    # auto-created by the broker with its own defaults (the first release or dead letter
    # did so). Metadata of all topics creates none.
    existing = require_kafka_answering(kafka.bootstrap, edgeloop_home())
    check_topics_exist(serve_topics(settings), existing, who="`train serve` reads or writes")

    async def main() -> None:
        async with RegistryClient.from_settings(registry_settings) as registry:
            consumer = TriggerConsumer(
                settings, kafka, registry, home=TrainerHome(home), keys_dir=keys
            )
            await run_services([consumer])

    with reachable(edgeloop_home(), kafka=kafka.bootstrap, registry=True):
        asyncio.run(main())


@train.command("trigger")
@click.option(
    "--app-id",
    default=None,
    help="The agents' app id (their control log is <app-id>-control-log). "
    "[env EDGELOOP_AGENTS_APP_ID; default edgeloop-agents]",
)
@click.option(
    "--request-id",
    default=None,
    help="Id of this request (default: a new one). Repeating an id is the same request: "
    "the trigger fires once (the agents remember the last 256 ids that fired; an older "
    "id fires again).",
)
@click.option("--detail", default="", help="Why (kept in the trigger's detail).")
def trigger(app_id: str | None, request_id: str | None, detail: str) -> None:
    """Ask the control plane for a MANUAL training trigger now (no debounce): appends the
    request to the agents' control log. The agents fire it over every hard example not
    yet covered, if at least EDGELOOP_CONTROL_TRIGGERS__MIN_EXAMPLES (default 1) are
    uncovered and the request id is not one of the last 256 that fired; otherwise they
    drop it (a log line and edgeloop_control_trigger_requests_dropped_total{reason}).
    `edgeloop control status` shows the uncovered hard examples; `train serve` retrains."""
    import asyncio
    import uuid

    from edgeloop.agents.context import now_us
    from edgeloop.agents.control.settings import ControlSettings
    from edgeloop.agents.control.triggers import MANUAL_MEMORY
    from edgeloop.agents.control_app import append_to_log, control_log
    from edgeloop.agents.control_stage import manual
    from edgeloop.cli.control_cmd import agents_app_id
    from edgeloop.core.settings import KafkaSettings

    # Every setting first: a bad one fails here, before any network.
    app_id = agents_app_id(app_id)
    control = ControlSettings.load()
    bootstrap = KafkaSettings.load().bootstrap
    rid = request_id or f"manual-{uuid.uuid4()}"
    with reachable(edgeloop_home(), kafka=bootstrap):
        offset = asyncio.run(append_to_log(bootstrap, app_id, manual(rid, now_us(), detail)))
    # Honest: the request is in the log; whether it fires is the agents' decision.
    click.echo(
        f"manual trigger request {rid} appended to {control_log(app_id)} at offset {offset}; "
        f"the agents fire a MANUAL trigger for {control.wiring.model_name} if at least "
        f"{control.triggers.min_examples} hard example(s) are uncovered and the id is not "
        f"one of the last {MANUAL_MEMORY} that fired (else they log and count the drop: "
        "edgeloop_control_trigger_requests_dropped_total)"
    )

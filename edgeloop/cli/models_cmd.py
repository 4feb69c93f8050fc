"""`edgeloop models`: bootstrap the shipped models; verify an artifact like a device does;
release a stored one to cohorts (an operator's FULL or CANARY)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from edgeloop.artifacts.errors import VerificationError
from edgeloop.artifacts.signing import (
    DEFAULT_TARGET,
    PRIVATE_KEY_NAME,
    PUBLIC_KEY_NAME,
    load_private_key,
    load_public_key,
)
from edgeloop.artifacts.verify import verify_artifact
from edgeloop.cli.fixes import reachable, require_key
from edgeloop.cli.options import load_settings
from edgeloop.core.errors import ConfigError
from edgeloop.core.settings import edgeloop_home


@click.group()
def models() -> None:
    """Build, sign, verify and release model artifacts."""


@models.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Trainer home: store/, checkpoints/, runs/ [$EDGELOOP_HOME/trainer].",
)
@click.option(
    "--key",
    type=click.Path(path_type=Path),
    default=None,
    help="Signing key [$EDGELOOP_HOME/keys/release.key].",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--nproc", default=1, show_default=True, help="Processes (GPUs) per training run.")
@click.option("--threads", default=1, show_default=True, help="CPU threads per process.")
@click.option("--teacher-epochs", default=15, show_default=True)
@click.option("--student-epochs", default=30, show_default=True)
def bootstrap(
    *,
    out: Path | None,
    key: Path | None,
    seed: int,
    nproc: int,
    threads: int,
    teacher_epochs: int,
    student_epochs: int,
) -> None:
    """Train teacher + student v1 on clean digits, export ONNX, quantize int8, gate, sign
    and store them. Writes runs/bootstrap/bootstrap-report.json and a PNG."""
    from rich.progress import Progress, SpinnerColumn, TimeElapsedColumn

    from edgeloop.trainer.bootstrap import bootstrap as run_bootstrap
    from edgeloop.trainer.home import TrainerHome

    home = TrainerHome(out or edgeloop_home() / "trainer")
    private = load_private_key(
        require_key(key or edgeloop_home() / "keys" / PRIVATE_KEY_NAME, "pass --key")
    )
    steps = [
        "train teacher",
        "train student",
        "export teacher",
        "export + quantize student",
        "sign + store",
    ]
    with Progress(SpinnerColumn(), *Progress.get_default_columns(), TimeElapsedColumn()) as bar:
        task_id = bar.add_task("bootstrap", total=len(steps))

        def advance(step: str) -> None:
            bar.update(task_id, description=step, completed=steps.index(step))

        report = run_bootstrap(
            home,
            private,
            seed=seed,
            nproc=nproc,
            threads=threads,
            teacher_epochs=teacher_epochs,
            student_epochs=student_epochs,
            progress=advance,
        )
        bar.update(task_id, completed=len(steps), description="done")
    student = report["student"]
    chosen = next(v for v in student["variants"] if v["mode"] == student["chosen"])
    click.echo(
        f"teacher  clean={report['teacher']['scores']['clean']:.4f} "
        f"drifted={report['teacher']['scores']['drifted']:.4f}"
    )
    click.echo(
        f"student  int8-{chosen['mode']} clean={chosen['scores']['clean']:.4f} "
        f"drifted={chosen['scores']['drifted']:.4f} "
        f"size={chosen['gate']['budget']['size_bytes']} B "
        f"p99={chosen['gate']['budget']['p99_ms']:.3f} ms"
    )
    click.echo(
        f"released {report['released'] or 'nothing'}; report: "
        f"{home.run_dir('bootstrap') / 'bootstrap-report.json'}"
    )
    if report.get("refused"):
        raise click.ClickException("gate refused the student: " + "; ".join(report["refused"]))


@models.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--min-version",
    type=int,
    default=None,
    help="The version the device runs now; the artifact must be newer.",
)
@click.option(
    "--pubkey",
    type=click.Path(path_type=Path),
    default=None,
    help="Release public key [$EDGELOOP_HOME/keys/release.pub].",
)
@click.option("--target", default=DEFAULT_TARGET, show_default=True)
def verify(artifact_dir: Path, min_version: int | None, pubkey: Path | None, target: str) -> None:
    """Verify an artifact exactly as a device does: signature, hashes, version, expiry,
    target. Exits 1 naming the failed check."""
    key = load_public_key(
        require_key(pubkey or edgeloop_home() / "keys" / PUBLIC_KEY_NAME, "pass --pubkey")
    )
    try:
        manifest = verify_artifact(artifact_dir, key, min_version=min_version, target=target)
    except VerificationError as exc:
        click.secho(f"REJECTED {artifact_dir}: {exc}", fg="red", err=True)
        raise SystemExit(1) from exc
    click.echo(
        json.dumps(
            {
                "ok": True,
                "model_name": manifest.model_name,
                "version": manifest.version,
                "target": manifest.target,
                "expires_at": manifest.expires_at,
            }
        )
    )


@models.command("release")
@click.option("--model", "model_name", required=True, help="Model name, e.g. digits-student.")
@click.option("--version", type=int, default=None, help="Stored version [newest in the store].")
@click.option("--stage", required=True, help="full | canary.")
@click.option(
    "--cohort",
    "cohorts",
    multiple=True,
    help="Cohort to release to (repeatable; at least one). One record per cohort.",
)
@click.option(
    "--share",
    type=float,
    default=None,
    help="CANARY only: share of the cohort's devices [the judge's canary share, "
    "EDGELOOP_CONTROL_JUDGE__CANARY_SHARE].",
)
@click.option(
    "--parent-version",
    type=int,
    default=None,
    help="The version a rollback reinstalls [the signed lineage's parent; CANARY needs one].",
)
@click.option(
    "--override-gate",
    "override_gate",
    default=None,
    metavar="REASON",
    help="Release a version no gate passed; logged with the operator, kept in `reason`.",
)
@click.option(
    "--artifact-base-url",
    default=None,
    help="Where devices download artifacts (as `train serve`) [file:// URLs of the store].",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Trainer home [$EDGELOOP_HOME/trainer]. [env EDGELOOP_TRAINER_HOME]",
)
def release(
    *,
    model_name: str,
    version: int | None,
    stage: str,
    cohorts: tuple[str, ...],
    share: float | None,
    parent_version: int | None,
    override_gate: str | None,
    artifact_base_url: str | None,
    out: Path | None,
) -> None:
    """Publish a stored, verified model as a FULL or CANARY ModelRelease to cohorts.

    FULL makes the version what a cohort runs: the parent the rollout judge rolls back to
    (release the bootstrap v1 FULL before the first canary). CANARY starts a judged rollout
    of a newer version. The version must verify as a device verifies it, and a gate must
    have passed it (the bootstrap or a retrain), unless --override-gate REASON says why
    not. Re-running the same release publishes the same event ids. Endpoints come from
    $EDGELOOP_HOME/infra.env.
    """
    import asyncio

    from aiokafka import AIOKafkaProducer

    from edgeloop.core.settings import KafkaSettings, RegistrySettings
    from edgeloop.schemas.registry.client import RegistryClient
    from edgeloop.trainer.home import TrainerHome
    from edgeloop.trainer.operator_release import (
        Published,
        ReleaseRequest,
        plan_release,
        publish_release,
    )
    from edgeloop.trainer.release_events import EventPublisher
    from edgeloop.trainer.serve_settings import TrainerServeSettings

    # `train serve`'s settings: the same trainer home, keys, topic, base URL and the
    # judge's canary share (EDGELOOP_CONTROL_JUDGE__CANARY_SHARE).
    overrides: dict[str, Any] = {}
    if artifact_base_url is not None:
        overrides["artifact_base_url"] = artifact_base_url
    settings = load_settings(TrainerServeSettings, **overrides)
    home = TrainerHome(out or settings.home or edgeloop_home() / "trainer")
    keys = settings.keys_dir or edgeloop_home() / "keys"
    pubkey = load_public_key(require_key(keys / PUBLIC_KEY_NAME, "set EDGELOOP_TRAINER_KEYS_DIR"))
    request = ReleaseRequest(
        model_name=model_name,
        stage=stage,
        cohorts=cohorts,
        version=version,
        share=share,
        parent_version=parent_version,
        override_gate=override_gate,
    )
    plan = plan_release(
        request,
        home,
        pubkey,
        default_share=settings.canary_share,
        artifact_base_url=settings.artifact_base_url,
    )
    kafka = KafkaSettings.load()
    topic = settings.releases_topic

    async def main() -> list[Published]:
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka.bootstrap,
            acks="all",
            enable_idempotence=kafka.idempotence,
            request_timeout_ms=15_000,
        )
        try:
            await producer.start()
            cluster = await producer.client.fetch_all_metadata()
            if not cluster.partitions_for_topic(topic):
                raise ConfigError(
                    f"topic {topic} does not exist on {kafka.bootstrap}; "
                    "create it with `edgeloop topics create`"
                )
            async with RegistryClient.from_settings(RegistrySettings.load()) as registry:
                return await publish_release(plan, EventPublisher(producer, registry), topic)
        finally:
            await producer.stop()

    with reachable(edgeloop_home(), kafka=kafka.bootstrap, registry=True):
        published = asyncio.run(main())
    gate = plan.reason["gate"]
    for p in published:
        click.echo(
            f"{plan.stage} {plan.model_name} v{plan.version} -> cohort {p.cohort}: "
            f"{p.topic} partition {p.partition} offset {p.offset} (event {p.event_id}, "
            f"share {plan.share}, parent {plan.parent_version}, gate {gate})"
        )

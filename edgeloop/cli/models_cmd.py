"""`edgeloop models`: bootstrap the shipped models; verify an artifact like a device does."""

from __future__ import annotations

import json
from pathlib import Path

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
from edgeloop.cli.fixes import require_key
from edgeloop.core.settings import edgeloop_home


@click.group()
def models() -> None:
    """Build, sign and verify model artifacts."""


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

"""`edgeloop models release` as an operator runs it, against the real broker and registry.

The trainer home is a copy of the session's bootstrapped one (`edge_models`: v1 stored and
its bootstrap report), so versions added here stay out of the other tests' store. What is
checked is what lands on `ml.model-releases.v1`, decoded as the judge and the bridge read
it, and what the command refuses to publish.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from edgeloop.artifacts.signing import load_private_key, sign_artifact
from edgeloop.infra.testing import InfraEndpoints
from edgeloop.trainer.home import TrainerHome
from tests.integration.agents_support import Read, read_topic
from tests.integration.bridge_support import prepare
from tests.integration.test_edge_daemon import EdgeModels, edge_models

pytestmark = pytest.mark.integration
__all__ = ["edge_models"]

MODEL = "digits-student"
RELEASES = "ml.model-releases.v1"


def trainer_home(models: EdgeModels, root: Path) -> TrainerHome:
    """The bootstrapped store and report, copied (the session's home is shared)."""
    home = TrainerHome(root / "trainer")
    shutil.copytree(models.store, home.root / "store")
    report = models.store.parent / "runs" / "bootstrap" / "bootstrap-report.json"
    (home.run_dir("bootstrap")).mkdir(parents=True)
    shutil.copy2(report, home.run_dir("bootstrap") / "bootstrap-report.json")
    return home


def add_ungated_v2(models: EdgeModels, home: TrainerHome) -> Path:
    """v1's files re-signed as v2 with the release key: valid, but no gate passed it."""
    stage = home.root / "stage-2"
    stage.mkdir()
    for name in ("model.onnx", "model-card.json"):
        shutil.copy2(models.student_v1 / name, stage / name)
    sign_artifact(stage, load_private_key(models.keys / "release.key"), model_name=MODEL,
                  version=2, files=["model.onnx", "model-card.json"])  # fmt: skip
    home.store.put(stage)
    return home.root / "store" / MODEL / "2"


def release(
    stack: InfraEndpoints, models: EdgeModels, home: TrainerHome, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
    env.update(EDGELOOP_HOME=str(stack.home), EDGELOOP_TRAINER_HOME=str(home.root),
               EDGELOOP_TRAINER_KEYS_DIR=str(models.keys))  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "edgeloop", "models", "release", "--model", MODEL, *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def refused(done: subprocess.CompletedProcess[str]) -> str:
    """The one `error:` line of a clean refusal (exit 1, no traceback, nothing printed)."""
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert done.stdout == "", done.stdout
    return errors[0]


async def records(stack: InfraEndpoints, prefix: str, count: int) -> Read:
    assert stack.registry is not None
    return await read_topic(stack.kafka.bootstrap, stack.registry.url, RELEASES,
                            key_prefix=prefix, done=lambda r: len(r.records) >= count,
                            timeout_s=60)  # fmt: skip


async def test_full_release_of_v1_to_two_cohorts_reads_back_and_reruns_as_the_same_events(
    infra_stack: InfraEndpoints, edge_models: EdgeModels, tmp_path: Path
) -> None:
    await prepare(infra_stack)
    home = trainer_home(edge_models, tmp_path)
    prefix = f"mr{infra_stack.kafka.flavor[:1]}{uuid.uuid4().hex[:6]}"
    cohorts = [f"{prefix}-north", f"{prefix}-south"]
    args = ["--stage", "full", "--cohort", cohorts[0], "--cohort", cohorts[1]]
    first = release(infra_stack, edge_models, home, *args)
    assert first.returncode == 0, first.stderr
    again = release(infra_stack, edge_models, home, *args)
    assert again.returncode == 0, again.stderr

    read = await records(infra_stack, prefix, 4)
    # Each cohort twice (the two cohorts may sit on different partitions: no order between).
    assert sorted(read.keys) == sorted(cohorts + cohorts)
    manifest = home.root / "store" / MODEL / "1" / "manifest.json"
    url = manifest.parent.resolve().as_uri() + "/"
    sha = hashlib.sha256(manifest.read_bytes()).hexdigest()
    for key, rec in zip(read.keys, read.records, strict=True):
        fields = ("cohort", "stage", "model_version", "share", "parent_version",
                  "artifact_url", "manifest_sha256", "target")  # fmt: skip
        assert tuple(rec[f] for f in fields) == (key, "FULL", 1, 1.0, None, url, sha, "pi5-cpu")
        reason = json.loads(rec["reason"])
        assert (reason["gate"], reason["released_by"]) == ("passed", "edgeloop models release")
        assert reason["gate_record"] == str(home.run_dir("bootstrap") / "bootstrap-report.json")
    # The rerun is the same two events (consumers drop them by id), not two new releases.
    ids = {c: {r["event_id"] for r in read.records if r["cohort"] == c} for c in cohorts}
    assert [len(v) for v in ids.values()] == [1, 1] and ids[cohorts[0]] != ids[cohorts[1]]
    # What the operator read: each cohort's topic, partition and offset, as Kafka has them.
    printed = first.stdout + again.stdout
    for key, (partition, offset) in zip(read.keys, read.positions, strict=True):
        assert f"cohort {key}: {RELEASES} partition {partition} offset {offset} " in printed


async def test_tampered_and_unsigned_canaries_are_refused_whatever_the_override(
    infra_stack: InfraEndpoints, edge_models: EdgeModels, tmp_path: Path
) -> None:
    await prepare(infra_stack)
    home = trainer_home(edge_models, tmp_path)
    prefix = f"mt{infra_stack.kafka.flavor[:1]}{uuid.uuid4().hex[:6]}"
    v2 = add_ungated_v2(edge_models, home)
    canary = ["--stage", "canary", "--cohort", prefix, "--parent-version", "1",
              "--override-gate", "operator test"]  # fmt: skip
    model = v2 / "model.onnx"
    good = model.read_bytes()
    model.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit, after signing
    line = refused(release(infra_stack, edge_models, home, *canary))
    assert "hash: model.onnx sha256" in line, line
    model.write_bytes(good)
    (v2 / "manifest.sig").unlink()  # unsigned
    line = refused(release(infra_stack, edge_models, home, *canary))
    assert "missing_file: cannot read manifest or signature" in line and str(v2) in line, line
    # A version that is not stored names the store and the bootstrap command.
    line = refused(release(infra_stack, edge_models, home, *canary, "--version", "7"))
    assert str(home.root / "store" / MODEL) in line and "`edgeloop models bootstrap`" in line

    # Nothing was published for the cohort: the first record it has is v1's FULL, sent now.
    done = release(infra_stack, edge_models, home, "--stage", "full", "--cohort", prefix,
                   "--version", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    read = await records(infra_stack, prefix, 1)
    assert [(r["stage"], r["model_version"]) for r in read.records] == [("FULL", 1)]


async def test_canary_of_an_ungated_version_needs_the_override_which_is_logged_and_recorded(
    infra_stack: InfraEndpoints, edge_models: EdgeModels, tmp_path: Path
) -> None:
    await prepare(infra_stack)
    home = trainer_home(edge_models, tmp_path)
    prefix = f"mo{infra_stack.kafka.flavor[:1]}{uuid.uuid4().hex[:6]}"
    add_ungated_v2(edge_models, home)
    canary = ["--stage", "canary", "--cohort", prefix, "--parent-version", "1", "--share", "0.5"]
    line = refused(release(infra_stack, edge_models, home, *canary))
    assert "--version 2: no gate passed digits-student v2" in line and "--override-gate" in line

    done = release(infra_stack, edge_models, home, *canary, "--override-gate", "demo bad model")
    assert done.returncode == 0, done.stderr
    warnings = [ln for ln in done.stderr.splitlines() if "release gate overridden" in ln]
    assert len(warnings) == 1 and "level=warning" in warnings[0], done.stderr
    assert "demo bad model" in warnings[0] and "operator=" in warnings[0], warnings[0]

    # The refused attempt published nothing: the cohort's only record is the overridden one.
    read = await records(infra_stack, prefix, 1)
    assert len(read.records) == 1
    rec = read.records[0]
    assert (rec["stage"], rec["model_version"], rec["parent_version"], rec["share"]) == (
        "CANARY", 2, 1, 0.5,
    )  # fmt: skip
    reason = json.loads(rec["reason"])
    assert (reason["gate"], reason["override"], reason["released_by"]) == (
        "overridden", "demo bad model", "edgeloop models release",
    )  # fmt: skip
    assert reason["operator"]

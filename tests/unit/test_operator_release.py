"""`edgeloop models release`'s rules and records, without Kafka (trainer/operator_release.py).

A trainer home is built by hand: signed artifacts (the model file is any bytes: nothing
here loads it) and the run records the trainer writes when a gate passes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeloop.artifacts.errors import VerificationError
from edgeloop.artifacts.manifest import Lineage
from edgeloop.artifacts.signing import (
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_artifact,
)
from edgeloop.core.errors import ConfigError
from edgeloop.infra.ports import free_port
from edgeloop.trainer.home import TrainerHome
from edgeloop.trainer.operator_release import (
    ReleasePlan,
    ReleaseRequest,
    operator_event_id,
    plan_release,
    release_record,
)
from edgeloop.trainer.release_events import ReleaseFacts
from edgeloop.trainer.release_events import release_record as trainer_record
from edgeloop.trainer.trigger_ledger import TriggerLedger

MODEL = "digits-student"


class Home:
    """A trainer home with a key pair; `add` stores signed versions."""

    def __init__(self, root: Path) -> None:
        self.home = TrainerHome(root / "trainer")
        self.priv_path, self.pub_path = generate_keypair(root / "keys")
        self.pub: Ed25519PublicKey = load_public_key(self.pub_path)

    def add(self, version: int, trigger_id: str | None, parent: int | None = None) -> Path:
        stage = self.home.root / "staging" / str(version)
        stage.mkdir(parents=True)
        (stage / "model.onnx").write_bytes(b"onnx bytes v%d" % version)
        sign_artifact(stage, load_private_key(self.priv_path), model_name=MODEL,
                      version=version, files=["model.onnx"],
                      lineage=Lineage(trigger_id=trigger_id, parent_version=parent))  # fmt: skip
        self.home.store.put(stage)
        return self.home.root / "store" / MODEL / str(version)

    def bootstrapped(self) -> None:
        """v1 as `models bootstrap` leaves it: stored, and its report says it passed."""
        self.add(1, "bootstrap")
        report = self.home.run_dir("bootstrap") / "bootstrap-report.json"
        report.parent.mkdir(parents=True)
        report.write_text(json.dumps({"released": {MODEL: 1, "digits-teacher": 1}}))

    def plan(self, stage: str, *cohorts: str, **kw: object) -> ReleasePlan:
        req = ReleaseRequest(model_name=MODEL, stage=stage, cohorts=cohorts, **kw)  # type: ignore[arg-type]
        return plan_release(req, self.home, self.pub, default_share=0.05, operator="alice")


@pytest.fixture
def h(tmp_path: Path) -> Home:
    home = Home(tmp_path)
    home.bootstrapped()
    return home


def test_full_of_the_bootstrap_model_is_gated_and_shaped_like_the_trainers(h: Home) -> None:
    plan = h.plan("full", "north", "south")
    recs = [release_record(plan, c, ts_us=1) for c in plan.cohorts]
    got = [(r["cohort"], r["stage"], r["model_version"], r["share"], r["parent_version"])
           for r in recs]  # fmt: skip
    assert got == [("north", "FULL", 1, 1.0, None), ("south", "FULL", 1, 1.0, None)]
    reason = json.loads(recs[0]["reason"])
    assert reason["gate"] == "passed" and reason["operator"] == "alice"
    assert reason["released_by"] == "edgeloop models release"
    assert reason["gate_record"].endswith("runs/bootstrap/bootstrap-report.json")
    assert recs[0]["artifact_url"] == (h.home.root / "store" / MODEL / "1").resolve().as_uri() + "/"
    # The same fields `train serve` writes: one schema, one meaning.
    facts = ReleaseFacts("t", MODEL, 1, 0, "u", "s", "pi5-cpu", 0, {}, {}, ())
    assert set(recs[0]) == set(trainer_record(facts, "c", 0.05))


def test_ungated_version_is_refused_without_override_and_recorded_with_one(h: Home) -> None:
    h.add(2, None)  # signed by hand with the release key: no run released it
    with pytest.raises(ConfigError, match=r"--version 2: no gate passed .* --override-gate"):
        h.plan("canary", "north", parent_version=1)
    with pytest.raises(ConfigError, match="no gate passed"):
        h.plan("full", "north")  # FULL of it just as much
    plan = h.plan("canary", "north", parent_version=1, override_gate="demo: bad release")
    reason = json.loads(release_record(plan, "north")["reason"])
    assert reason == {"gate": "overridden", "override": "demo: bad release", "operator": "alice",
                      "released_by": "edgeloop models release"}  # fmt: skip
    assert (plan.stage, plan.share, plan.parent_version) == ("CANARY", 0.05, 1)


def test_a_retrain_is_gated_by_its_report_or_by_train_serves_ledger(h: Home) -> None:
    h.add(2, "trig-a", parent=1)
    h.add(3, "trig-b", parent=2)
    report = h.home.run_dir("retrain-trig-a") / "retrain-report.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"trigger_id": "trig-a", "released_version": 2}))
    TriggerLedger(h.home.root / "triggers" / "ledger.json").finish("trig-b", "released", version=3)
    two = h.plan("canary", "c", version=2)  # parent from the signed lineage
    three = h.plan("canary", "c", version=3)
    assert (two.parent_version, json.loads(release_record(two, "c")["reason"])["gate"]) == (
        1,
        "passed",
    )
    assert three.reason["gate_record"].endswith("triggers/ledger.json")
    # A report naming another version is no evidence for this one.
    report.write_text(json.dumps({"trigger_id": "trig-a", "released_version": 7}))
    with pytest.raises(ConfigError, match="no gate passed"):
        h.plan("canary", "c", version=2)


def test_event_id_is_deterministic_and_names_the_release(h: Home) -> None:
    a = release_record(h.plan("full", "north"), "north")
    b = release_record(h.plan("full", "north"), "north")
    assert a["event_id"] == b["event_id"] == operator_event_id(MODEL, 1, "north", "FULL", None)
    uuid.UUID(a["event_id"])  # the schema's text UUID
    others = {operator_event_id(MODEL, 1, "south", "FULL", None),
              operator_event_id(MODEL, 2, "north", "FULL", None),
              operator_event_id(MODEL, 1, "north", "CANARY", None),
              operator_event_id(MODEL, 1, "north", "FULL", 0)}  # fmt: skip
    assert a["event_id"] not in others and len(others) == 4


@pytest.mark.parametrize(
    ("stage", "kw", "message"),
    [
        ("canary", {"share": 0.0, "parent_version": 1}, "--share 0.0"),
        ("canary", {"share": 1.0, "parent_version": 1}, "--share 1.0"),
        ("canary", {"share": -0.5, "parent_version": 1}, "--share -0.5"),
        ("full", {"share": 0.5}, "--share 0.5: a FULL"),
        ("rollback", {}, "--stage 'rollback'"),
        ("canary", {"parent_version": 2}, "--parent-version 2: must be older"),
        ("full", {"version": 9}, "--version 9: digits-student v9 is not in the store"),
        ("full", {"override_gate": " "}, "--override-gate ''"),
    ],
)
def test_bad_values_are_named(h: Home, stage: str, kw: dict[str, object], message: str) -> None:
    h.add(2, None)
    with pytest.raises(ConfigError) as err:
        h.plan(stage, "north", override_gate=kw.pop("override_gate", "x"), **kw)
    assert message in str(err.value), err.value


@pytest.mark.parametrize("cohort", ["", "two words", "tab\tbed", "x" * 129, "bell\x07"])
def test_bad_cohorts_are_named(h: Home, cohort: str) -> None:
    with pytest.raises(ConfigError, match="--cohort"):
        h.plan("full", "north", cohort)


def test_no_cohort_and_duplicates(h: Home) -> None:
    with pytest.raises(ConfigError, match="--cohort is required"):
        h.plan("full")
    assert h.plan("full", "a", "b", "a").cohorts == ("a", "b")


def test_canary_without_a_parent_is_refused(h: Home) -> None:
    h.add(2, None)
    with pytest.raises(ConfigError, match="--parent-version is required"):
        h.plan("canary", "north", override_gate="x")


def test_tampered_or_foreign_artifacts_are_refused_even_with_override(
    h: Home, tmp_path: Path
) -> None:
    v2 = h.add(2, None)
    (v2 / "model.onnx").write_bytes(b"swapped after signing")
    with pytest.raises(VerificationError, match="hash"):
        h.plan("canary", "north", parent_version=1, override_gate="x")
    # v3 signed with another key: the device's public key refuses it.
    other_priv, _ = generate_keypair(tmp_path / "other")
    stage = tmp_path / "v3"
    stage.mkdir()
    (stage / "model.onnx").write_bytes(b"x")
    sign_artifact(stage, load_private_key(other_priv), model_name=MODEL, version=3,
                  files=["model.onnx"])  # fmt: skip
    h.home.store.put(stage)
    with pytest.raises(VerificationError, match="signature"):
        h.plan("canary", "north", version=3, parent_version=1, override_gate="x")
    # A folder whose signed manifest is another version's.
    shutil.copytree(h.home.root / "store" / MODEL / "1", h.home.root / "store" / MODEL / "4")
    with pytest.raises(ConfigError, match="signed manifest is digits-student v1"):
        h.plan("full", "north", version=4, override_gate="x")


def _cli(h: Home, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real entry point, Kafka and the registry at a closed loopback port."""
    port = free_port()  # nothing listens there, and no later server in this run gets it
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
    env.update(EDGELOOP_HOME=str(tmp_path / "home"), EDGELOOP_TRAINER_HOME=str(h.home.root),
               EDGELOOP_TRAINER_KEYS_DIR=str(h.pub_path.parent),
               EDGELOOP_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}",
               EDGELOOP_REGISTRY_URL=f"http://127.0.0.1:{port}")  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "edgeloop", "models", "release", "--model", MODEL, *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert done.stdout == ""
    return errors[0]


def test_cli_rule_error_is_one_line_before_any_connection(h: Home, tmp_path: Path) -> None:
    """Exit 1, one `error:` line, no traceback; Kafka is a closed port, so reaching for it
    would have shown as the unreachable error instead."""
    h.add(2, None)
    line = _error_line(_cli(h, tmp_path, "--stage", "canary", "--cohort", "north",
                            "--parent-version", "1"))  # fmt: skip
    assert "--version 2: no gate passed" in line, line


def test_cli_unreachable_kafka_names_the_fix(h: Home, tmp_path: Path) -> None:
    line = _error_line(_cli(h, tmp_path, "--stage", "full", "--cohort", "north"))
    assert "is not reachable" in line and "`edgeloop infra up`" in line, line

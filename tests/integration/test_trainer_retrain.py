"""The headline: the bootstrap student, retrained on hard examples mined from drifted field
data, gets clearly better on the drifted holdout without losing more on the clean holdout
than the gate allows; a candidate trained on wrong labels is refused and not released."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeloop.artifacts import generate_keypair, load_private_key, load_public_key
from edgeloop.artifacts.verify import verify_artifact
from edgeloop.trainer.bootstrap import bootstrap
from edgeloop.trainer.field import mine_field_pool
from edgeloop.trainer.gate import GatePolicy
from edgeloop.trainer.hard_examples import HardExampleSet
from edgeloop.trainer.home import TrainerHome
from edgeloop.trainer.release import STUDENT_MODEL
from edgeloop.trainer.retrain import RetrainRequest, retrain

pytestmark = pytest.mark.slow
POLICY = GatePolicy()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainerHome, Path, Path]:
    root = tmp_path_factory.mktemp("trainer")
    priv, pub = generate_keypair(root / "keys")
    home = TrainerHome(root / "home")
    report = bootstrap(home, load_private_key(priv), threads=2)
    assert report["released"] == {"digits-teacher": 1, "digits-student": 1}
    return home, priv, pub


def test_retrain_on_hard_examples_improves_drifted_and_keeps_clean(
    env: tuple[TrainerHome, Path, Path], tmp_path: Path
) -> None:
    home, priv, pub = env
    mined = mine_field_pool(home, tmp_path / "hard.npz")
    assert mined["hard_examples"] > 100
    report = retrain(
        home,
        load_private_key(priv),
        load_public_key(pub),
        RetrainRequest(
            hard_examples=tmp_path / "hard.npz",
            trigger_id="t-drift",
            offset_ranges={"ml.hard-examples.v1/0": [0, 999]},
            nproc=2,
        ),
        policy=POLICY,
    )
    serving = report["serving"]
    chosen = next(
        v for v in report["candidate"]["variants"] if v["mode"] == report["candidate"]["chosen"]
    )["scores"]
    print(
        "\nHEADLINE",
        json.dumps(
            {
                "mined": mined,
                "serving_v1_int8": serving,
                "candidate_int8": chosen,
                "quantization": report["candidate"]["chosen"],
            }
        ),
    )
    assert chosen["drifted"] - serving["drifted"] >= 0.10
    assert serving["clean"] - chosen["clean"] <= POLICY.max_clean_drop
    assert report["released_version"] == 2
    assert report["refused"] == []
    art = home.root / "store" / STUDENT_MODEL / "2"
    manifest = verify_artifact(art, load_public_key(pub), min_version=1)
    assert manifest.lineage.parent_version == 1
    assert manifest.lineage.trigger_id == "t-drift"
    assert manifest.lineage.interconnect["kind"] == "none"
    assert (home.run_dir("retrain-t-drift") / "retrain-accuracy.png").stat().st_size > 0


def test_candidate_trained_on_wrong_labels_is_refused(
    env: tuple[TrainerHome, Path, Path], tmp_path: Path
) -> None:
    home, priv, pub = env
    versions_before = home.store.versions(STUDENT_MODEL)
    pool = mine_field_pool(home, tmp_path / "hard.npz")
    hard = HardExampleSet.load(tmp_path / "hard.npz")
    # A broken labeller: every label shifted by one class.
    HardExampleSet(hard.x, (hard.label + 1) % 10, hard.reason).save(tmp_path / "bad.npz")
    report = retrain(
        home,
        load_private_key(priv),
        load_public_key(pub),
        RetrainRequest(
            hard_examples=tmp_path / "bad.npz", trigger_id="t-bad", distill_alpha=0.0, epochs=10
        ),
        policy=POLICY,
    )
    assert pool["hard_examples"] > 0
    assert report["released_version"] is None
    assert any("drifted holdout" in r or "clean holdout" in r for r in report["refused"])
    assert home.store.versions(STUDENT_MODEL) == versions_before
    assert np.isfinite(report["candidate"]["variants"][0]["scores"]["clean"])

"""Ground truth on the device side: a simulator's frames carry their label, and the
pipeline counts correct predictions per cohort and serving model version (the demo's
accuracy), decisions per cohort, and the offload -> verdict round trip."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry

from edgeloop.edge.control import VerdictCounter
from edgeloop.edge.inference import LoadedModel
from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.outbox import Outbox
from edgeloop.edge.pipeline import PendingVerdicts, Pipeline
from edgeloop.edge.policy import ByteBudget, OffloadPolicy
from edgeloop.edge.source import Frame
from edgeloop.edge.state import AppliedThreshold
from edgeloop.schemas.framing import SingleObjectCodec
from tests.unit.test_edge_updates import Device, make_release_dir


class Pixels:
    """The preprocessing a device needs, for the tiny (N, 1, 8, 8) test model."""

    name = "tiny"
    input_shape = (1, 1, 8, 8)

    def preprocess(self, raw: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
        return np.asarray(raw, np.float32)[:, None]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def pipeline(
    tmp_path: Path, model: LoadedModel, metrics: EdgeMetrics, cohort: str, tau: float
) -> Pipeline:
    return Pipeline(
        device_id=f"dev-{cohort}",
        cohort=cohort,
        task=Pixels(),
        model=model,
        threshold=AppliedThreshold(1, tau, "MAX_PROB", 0.0),
        policy=OffloadPolicy(ByteBudget(1e9, 10**9, time.monotonic()), random.Random(0)),
        outbox=Outbox(tmp_path / f"{cohort}.db", capacity=10_000),
        codec=SingleObjectCodec(),
        metrics=metrics,
        pending=PendingVerdicts(1000),
    )


@pytest.fixture
def models(tmp_path: Path) -> tuple[LoadedModel, LoadedModel]:
    from edgeloop.artifacts.signing import generate_keypair

    priv, pub = generate_keypair(tmp_path / "keys")
    v1 = Device(tmp_path / "d1", pub).updater.boot(make_release_dir(tmp_path / "rel", priv, 1))
    v2 = Device(tmp_path / "d2", pub).updater.boot(make_release_dir(tmp_path / "rel", priv, 2))
    return v1, v2


def test_predictions_count_against_labels_per_cohort_and_version(
    tmp_path: Path, models: tuple[LoadedModel, LoadedModel]
) -> None:
    v1, v2 = models
    metrics = EdgeMetrics()
    reg = metrics.registry
    rng = np.random.default_rng(3)
    images = rng.normal(size=(60, 8, 8)).astype(np.float32)
    # The labels are what model v1 predicts for the first half of the frames, so the
    # expected counts are known without trusting the code under test.
    v1_pred = v1.logits(images[:, None]).argmax(axis=1)
    labels = np.where(np.arange(60) % 2 == 0, v1_pred, (v1_pred + 1) % 10)
    a = pipeline(tmp_path, v1, metrics, "a", tau=0.5)
    decided: dict[str, int] = {}
    for i in range(40):
        out = a.process(Frame(images[i], 0, int(labels[i])))
        decided[out.decision] = decided.get(out.decision, 0) + 1
    a.model = v2  # a swap: later frames count for v2
    v2_pred = v2.logits(images[40:, None]).argmax(axis=1)
    for i in range(40, 60):
        out = a.process(Frame(images[i], 0, int(labels[i])))
        decided[out.decision] = decided.get(out.decision, 0) + 1
    b = pipeline(tmp_path, v1, metrics, "b", tau=0.5)
    for i in range(10):
        b.process(Frame(images[i], 0))  # no label: not counted as a prediction

    name = "edgeloop_edge_predictions_total"
    assert sample(reg, name, cohort="a", model_version="1", correct="true") == 20
    assert sample(reg, name, cohort="a", model_version="1", correct="false") == 20
    v2_right = int((v2_pred == labels[40:]).sum())
    assert sample(reg, name, cohort="a", model_version="2", correct="true") == v2_right
    assert sample(reg, name, cohort="a", model_version="2", correct="false") == 20 - v2_right
    assert sample(reg, name, cohort="b", model_version="1", correct="true") == 0
    assert sample(reg, name, cohort="b", model_version="1", correct="false") == 0
    # Decisions are counted per cohort, under the decision's own name.
    for decision, n in decided.items():
        got = sample(reg, "edgeloop_edge_decisions_total", device="dev-a", cohort="a",
                     decision=decision)  # fmt: skip
        assert got == n
    b_total = sum(
        sample(reg, "edgeloop_edge_decisions_total", device="dev-b", cohort="b", decision=d)
        for d in ("LOCAL", "OFFLOAD", "AUDIT")
    )
    assert b_total == 10


def test_a_verdict_records_the_offload_round_trip(
    tmp_path: Path, models: tuple[LoadedModel, LoadedModel]
) -> None:
    v1, _ = models
    metrics = EdgeMetrics()
    p = pipeline(tmp_path, v1, metrics, "a", tau=1.01)  # everything is offloaded
    out = p.process(Frame(np.zeros((8, 8), np.float32), 0, 0))
    assert out.decision == "OFFLOAD"
    counter = VerdictCounter("dev-a", p.pending, metrics)
    # The offload request is the frame's second outbox row: seq + 1.
    verdict = {"request_event_id": f"dev-a:{out.seq + 1}", "label": out.prediction}
    assert counter.handle(verdict) == "agree"  # type: ignore[arg-type]
    reg = metrics.registry
    assert sample(reg, "edgeloop_edge_verdict_latency_seconds_count", device="dev-a") == 1
    # An unmatched verdict has no round trip to measure.
    assert counter.handle({"request_event_id": "dev-a:999", "label": 0}) == "unmatched"  # type: ignore[arg-type]
    assert sample(reg, "edgeloop_edge_verdict_latency_seconds_count", device="dev-a") == 1

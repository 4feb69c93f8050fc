"""The verdict stage's step: one CloudVerdict per request (ids derived from the request),
hard examples with every reason that applies and in the form `train serve` reads, and each
malformed class of request dead-lettered with its reason."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pytest

from edgeloop.agents.dedupe import BatchDedupe
from edgeloop.agents.hardness import RouterConfig
from edgeloop.agents.ids import derived_id
from edgeloop.agents.records import StepResult
from edgeloop.agents.teacher import TeacherOutput
from edgeloop.agents.verdict_stage import Prepared, RouterPolicy, VerdictStep
from edgeloop.tasks.digits import DigitsTask
from edgeloop.trainer.hard_example_source import to_example_set
from tests.unit.agents_support import book, frame, offload, raw

SHAPE = (1, 8, 8)


def _step(**policy: Any) -> VerdictStep:
    cfg = RouterConfig(per_device_cap=policy.pop("per_device_cap", 50))
    return VerdictStep(
        book(), RouterPolicy(cfg, **policy), preprocess=DigitsTask().preprocess,
        max_decoded_bytes=1 << 20, dlq_payload_bytes=64,
    )  # fmt: skip


def _teacher(label: int, confidence: float = 0.9) -> TeacherOutput:
    probs = np.full(10, (1 - confidence) / 9, np.float32)
    probs[label] = confidence
    return TeacherOutput(label, confidence, probs)


def _through(
    step: VerdictStep, requests: list[dict[str, Any]], labels: list[int], table: dict | None = None
) -> tuple[list[Prepared], StepResult, list[tuple[str, dict[str, Any]]]]:
    table = {} if table is None else table
    batch = [
        raw(frame("OffloadRequest", r), r["device_id"], "edge.offload.v1", i)
        for i, r in enumerate(requests)
    ]
    dedupe = BatchDedupe(64, table.get)
    ready, result = step.prepare(batch, dedupe, SHAPE, now_us=2_000_000_000_000_000)
    outs = [_teacher(labels[int(p.request["seq"]) % len(labels)]) for p in ready]
    step.finish(ready, outs, teacher_name="t", teacher_version=3,
                now_us=2_000_000_000_000_000, result=result)  # fmt: skip
    table.update(dedupe.changed())
    b = step.book
    return ready, result, [(o.topic, b.decode(o.value)[1]) for o in result.outputs]


def test_every_request_gets_one_verdict_with_a_derived_id() -> None:
    reqs = [offload("d1", s, prediction=3) for s in range(1, 5)]
    reqs.append(offload("d1", 5, reason="AUDIT", confidence=0.95, prediction=3))
    _, _, out = _through(_step(near_duplicates=False), reqs, labels=[3, 3, 5])
    verdicts = [rec for topic, rec in out if topic == "cloud.verdicts.v1"]
    assert [v["request_event_id"] for v in verdicts] == [r["event_id"] for r in reqs]
    assert [v["event_id"] for v in verdicts] == [derived_id("verdict", r["event_id"]) for r in reqs]
    assert {v["teacher_model"] for v in verdicts} == {"t"}
    assert [v["agree"] for v in verdicts] == [v["label"] == 3 for v in verdicts]


def test_hard_examples_carry_every_reason_and_the_teacher_label() -> None:
    reqs = [
        offload("d", 1, confidence=0.4, prediction=3),  # low confidence, teacher agrees
        offload("d", 2, confidence=0.4, prediction=3),  # low confidence, teacher says 5
        offload("d", 3, reason="AUDIT", confidence=0.95, prediction=3),  # confident audit
        offload("d", 4, reason="OFFLOAD", confidence=0.95, prediction=3),  # nothing hard
    ]
    _, result, out = _through(_step(near_duplicates=False), reqs, labels=[3, 3, 5, 3, 3])
    hard = {rec["source_event_id"]: rec for topic, rec in out if topic == "ml.hard-examples.v1"}
    assert hard["d:1"]["reasons"] == ["LOW_CONFIDENCE"]
    assert hard["d:2"]["reasons"] == ["DISAGREE", "LOW_CONFIDENCE"] and hard["d:2"]["label"] == 5
    assert hard["d:3"]["reasons"] == ["AUDIT"]
    assert "d:4" not in hard
    assert hard["d:1"]["event_id"] == derived_id("hard", "d:1")
    assert result.tally["hard:LOW_CONFIDENCE"] == 2


def test_drifting_cohorts_are_routed_with_drift() -> None:
    reqs = [offload("d", 1, confidence=0.95, prediction=3)]
    _, _, out = _through(_step(drifting_cohorts=frozenset({"canary"})), reqs, labels=[3, 3])
    (hard,) = [rec for topic, rec in out if topic == "ml.hard-examples.v1"]
    assert hard["reasons"] == ["DRIFT"]


def test_hard_examples_are_what_train_serve_reads() -> None:
    # The trainer's own decoder (trigger consumer -> RangeReader -> to_example_set).
    rng = np.random.default_rng(0)
    imgs = [rng.random((8, 8)).astype(np.float32) for _ in range(6)]
    reqs = [offload("d", i + 1, pixels=img) for i, img in enumerate(imgs)]
    ready, _, out = _through(_step(near_duplicates=False), reqs, labels=[7])
    records = [rec for topic, rec in out if topic == "ml.hard-examples.v1"]
    examples = to_example_set(records, SHAPE, num_classes=10)
    assert len(examples) == 6
    assert (examples.label == 7).all()
    np.testing.assert_allclose(examples.x, np.stack([p.x for p in ready]))


def test_near_duplicates_and_the_budget_suppress_and_count() -> None:
    img = np.random.default_rng(1).random((8, 8)).astype(np.float32)
    reqs = [offload("d", s, pixels=img) for s in range(1, 4)]
    _, result, out = _through(_step(), reqs, labels=[3])
    assert sum(t == "ml.hard-examples.v1" for t, _ in out) == 1
    assert result.tally["suppressed:near_duplicate"] == 2
    rng = np.random.default_rng(2)
    reqs = [offload("e", s, pixels=rng.random((8, 8)).astype(np.float32)) for s in range(1, 5)]
    _, result, out = _through(_step(near_duplicates=False, per_device_cap=2), reqs, labels=[3])
    assert sum(t == "ml.hard-examples.v1" for t, _ in out) == 2
    assert result.tally["suppressed:budget"] == 2
    assert sum(t == "cloud.verdicts.v1" for t, _ in out) == 4  # verdicts are never budgeted


def test_a_redelivered_request_is_answered_once() -> None:
    table: dict[str, bytes] = {}
    step = _step(near_duplicates=False)
    reqs = [offload("d", 1), offload("d", 2), offload("d", 1)]
    _, result, out = _through(step, reqs, labels=[3], table=table)
    assert sum(t == "cloud.verdicts.v1" for t, _ in out) == 2
    _, result, out = _through(step, [offload("d", 2), offload("d", 3)], labels=[3], table=table)
    assert [rec["request_event_id"] for t, rec in out if t == "cloud.verdicts.v1"] == ["d:3"]
    assert result.tally["duplicate"] == 1


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (offload("d", 1, encoding="UNKNOWN"), "bad_input_encoding"),
        # A zlib bomb: 8 MiB of zeros compressed to a few KiB, declared 8x8.
        (offload("d", 1, data=zlib.compress(bytes(8 << 20))), "input_too_large"),
        (offload("d", 1, shape=[4096, 4096]), "input_too_large"),
        (offload("d", 1, shape=[3, 3]), "input_too_large"),  # inflates past its shape
        (offload("d", 1, shape=[16, 4]), "bad_input_shape"),  # not the teacher's input
        (offload("d", 1, encoding="PNG", data=b"not a png"), "bad_input_data"),
    ],
    ids=["encoding", "zlib-bomb", "too-large", "longer-than-shape", "wrong-shape", "bad-png"],
)
def test_bad_inputs_are_dead_lettered_with_their_reason(
    request_: dict[str, Any], reason: str
) -> None:
    _, _, out = _through(_step(), [request_, offload("d", 2)], labels=[3])
    dead = [rec for topic, rec in out if topic == "edge.offload.dlq.v1"]
    assert [d["reason"] for d in dead] == [reason]
    assert dead[0]["stage"] == "agents-verdicts" and dead[0]["device_id"] == "d"
    # The good request next to it is answered.
    assert [rec["request_event_id"] for t, rec in out if t == "cloud.verdicts.v1"] == ["d:2"]

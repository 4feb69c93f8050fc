"""The hard-example router's filters, budget and near-duplicate suppression (no Kafka)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from edgeloop.agents.hardness import (
    REASONS,
    HardExampleBudget,
    NearDuplicateFilter,
    RouterConfig,
    hard_reasons,
    normalised_entropy,
)
from edgeloop.agents.teacher import TeacherOutput
from edgeloop.core.errors import ConfigError, DecodeError
from edgeloop.tasks.digits import DigitsTask, load_raw

# Thresholds with exact binary fractions, so "at the threshold" is exact in floating point.
CFG = RouterConfig(confidence_threshold=0.75, margin_threshold=0.25, entropy_threshold=0.5)


def _teacher(label: int, confidence: float = 0.9) -> TeacherOutput:
    return TeacherOutput(label=label, confidence=confidence, probs=np.zeros(10, np.float32))


def _reasons(
    *,
    pred: int = 3,
    conf: float = 0.9,
    probs: Sequence[float] | None = None,
    teacher: TeacherOutput | None = None,
    audit: bool = False,
    drifting: bool = False,
    cfg: RouterConfig = CFG,
) -> list[str]:
    return hard_reasons(
        edge_prediction=pred,
        edge_confidence=conf,
        edge_probs=probs,
        teacher=teacher,
        audit=audit,
        drifting=drifting,
        cfg=cfg,
    )


def test_a_confident_agreeing_sample_is_not_hard() -> None:
    assert _reasons(conf=0.9, probs=[0.9375, 0.0625], teacher=_teacher(3)) == []


def test_disagreement_with_the_teacher() -> None:
    assert _reasons(teacher=_teacher(5)) == ["DISAGREE"]
    assert _reasons(teacher=_teacher(3)) == []
    assert _reasons(teacher=None) == []  # no verdict: no disagreement claimed


@pytest.mark.parametrize(
    ("conf", "hard"), [(0.0, True), (0.749, True), (0.75, False), (0.76, False), (1.0, False)]
)
def test_low_confidence_strictly_below_the_threshold(conf: float, hard: bool) -> None:
    assert ("LOW_CONFIDENCE" in _reasons(conf=conf)) is hard


@pytest.mark.parametrize(
    ("probs", "hard"),
    [
        ([0.625, 0.375], False),  # margin 0.25: exactly at the threshold
        ([0.5, 0.5], True),  # margin 0
        ([0.5625, 0.4375], True),  # margin 0.125
        ([0.875, 0.125], False),  # margin 0.75
        ([0.5, 0.25, 0.25], False),  # top-1 - top-2 = 0.25, not top-1 - bottom
        ([0.375, 0.25, 0.375], True),  # tie for first, in any position
    ],
)
def test_low_margin_uses_the_top_two(probs: list[float], hard: bool) -> None:
    assert ("LOW_MARGIN" in _reasons(probs=probs)) is hard


def test_high_entropy_is_normalised_by_class_count() -> None:
    uniform10 = [0.1] * 10
    assert normalised_entropy(np.asarray(uniform10)) == pytest.approx(1.0)
    assert normalised_entropy(np.asarray([1.0, 0.0, 0.0])) == 0.0
    assert "HIGH_ENTROPY" in _reasons(probs=uniform10)
    # Same top-1 for 2 and 10 classes, very different spread: normalised entropy tells.
    peaked = [0.9] + [0.1 / 9] * 9  # H/ln10 ~ 0.24
    spread = [0.9, 0.1]  # H/ln2 ~ 0.47
    assert "HIGH_ENTROPY" not in _reasons(probs=peaked)
    assert "HIGH_ENTROPY" not in _reasons(probs=spread)
    assert "HIGH_ENTROPY" in _reasons(probs=[0.8, 0.2], cfg=RouterConfig(entropy_threshold=0.7))


def test_entropy_threshold_is_strict() -> None:
    p = np.asarray([0.7, 0.2, 0.1])
    at = RouterConfig(entropy_threshold=normalised_entropy(p))
    assert "HIGH_ENTROPY" not in _reasons(probs=p.tolist(), cfg=at)
    below = RouterConfig(entropy_threshold=normalised_entropy(p) - 1e-9)
    assert "HIGH_ENTROPY" in _reasons(probs=p.tolist(), cfg=below)


def test_margin_and_entropy_need_the_probability_vector() -> None:
    # An OffloadRequest carries only the top confidence: nothing is guessed from it.
    assert _reasons(conf=0.5, probs=None) == ["LOW_CONFIDENCE"]


def test_audit_and_drift_flags() -> None:
    assert _reasons(audit=True) == ["AUDIT"]
    assert _reasons(drifting=True) == ["DRIFT"]


def test_every_reason_at_once_in_schema_order() -> None:
    got = _reasons(conf=0.1, probs=[0.1] * 10, teacher=_teacher(7), audit=True, drifting=True)
    assert got == list(REASONS)
    assert got == ["DISAGREE", "LOW_CONFIDENCE", "LOW_MARGIN", "HIGH_ENTROPY", "AUDIT", "DRIFT"]


def test_an_unsure_teacher_routes_nothing_when_asked() -> None:
    cfg = RouterConfig(teacher_min_confidence=0.5)
    assert _reasons(conf=0.1, teacher=_teacher(7, confidence=0.49), cfg=cfg) == []
    assert _reasons(conf=0.1, teacher=_teacher(7, confidence=0.5), cfg=cfg) == [
        "DISAGREE",
        "LOW_CONFIDENCE",
    ]


@pytest.mark.parametrize(
    ("conf", "probs", "words"),
    [
        (float("nan"), None, "confidence nan"),
        (1.5, None, "confidence 1.5"),
        (0.5, [0.5, 0.6], "not a probability vector"),
        (0.5, [1.0], "at least 2 classes"),
        (0.5, [float("nan"), 1.0], "not a probability vector"),
        (0.5, [-0.5, 1.5], "not a probability vector"),
    ],
)
def test_bad_edge_outputs_are_decode_errors(
    conf: float, probs: list[float] | None, words: str
) -> None:
    with pytest.raises(DecodeError, match=words) as err:
        _reasons(conf=conf, probs=probs)
    assert err.value.reason == "bad_edge_output"


@pytest.mark.parametrize(
    "over",
    [
        {"confidence_threshold": 1.5},
        {"entropy_threshold": -0.1},
        {"per_device_cap": 0},
        {"window_s": 0.0},
        {"near_dup_hamming": 65},
    ],
)
def test_bad_router_settings_are_config_errors(over: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=next(iter(over))):
        RouterConfig(**over)  # type: ignore[arg-type]


def test_budget_caps_each_device_per_window() -> None:
    budget = HardExampleBudget(RouterConfig(per_device_cap=3, global_cap=100, window_s=10))
    got = [budget.admit("a", 100.0 + i * 0.1) for i in range(5)]
    assert got == [True, True, True, False, False]
    assert [budget.admit("b", 101.0) for _ in range(3)] == [True, True, True]
    assert budget.refused == {"device_cap": 2}
    # The next window starts fresh for everyone.
    assert budget.admit("a", 110.0)
    assert budget.admitted == 7


def test_budget_global_cap_across_devices() -> None:
    budget = HardExampleBudget(RouterConfig(per_device_cap=2, global_cap=5, window_s=60))
    got = [budget.admit(f"d{i}", 60.0 + i) for i in range(8)]
    assert got == [True] * 5 + [False] * 3
    assert budget.refused == {"global_cap": 3}
    assert budget.admitted == 5
    assert [budget.admit(f"d{i}", 120.0) for i in range(3)] == [True, True, True]


def test_budget_a_late_record_counts_against_the_current_window() -> None:
    budget = HardExampleBudget(RouterConfig(per_device_cap=1, global_cap=10, window_s=10))
    assert budget.admit("a", 25.0)
    # Event time from the previous window: it does not reopen that window's budget.
    assert not budget.admit("a", 15.0)
    assert budget.window == 2


def _digits() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_raw()
    return images, labels


def test_a_slightly_noised_copy_is_suppressed_a_different_digit_is_not() -> None:
    images, labels = _digits()
    rng = np.random.default_rng(1)
    first = images[0]
    other = images[int(np.flatnonzero(labels != labels[0])[0])]
    filt = NearDuplicateFilter(RouterConfig())
    assert not filt.seen("dev-1", first)
    noisy = np.clip(first + rng.normal(0, 0.02, first.shape), 0, 1).astype(np.float32)
    assert filt.seen("dev-1", noisy)
    assert not filt.seen("dev-1", other)
    # Another device's frames never suppress this one's.
    assert not filt.seen("dev-2", noisy)
    assert (filt.checked, filt.suppressed) == (4, 1)


def test_near_duplicates_survive_preprocessing_offset_and_many_devices_stay_distinct() -> None:
    images, labels = _digits()
    task = DigitsTask()
    filt = NearDuplicateFilter(RouterConfig())
    # The same frame raw in [0, 1] or preprocessed (centred, channel axis): same hash.
    assert not filt.seen("dev", images[5])
    assert filt.seen("dev", task.preprocess(images[5][None])[0])
    # One distinct digit per class: none suppresses another.
    firsts = [images[int(np.flatnonzero(labels == k)[0])] for k in range(10)]
    fresh = NearDuplicateFilter(RouterConfig())
    assert [fresh.seen("dev", x) for x in firsts] == [False] * 10


def test_near_duplicate_memory_is_bounded() -> None:
    images, _ = _digits()
    filt = NearDuplicateFilter(RouterConfig(near_dup_history=2, near_dup_devices=2))
    a, b, c = images[0], images[1], images[2]
    for x in (a, b, c):
        assert not filt.seen("dev", x)
    assert not filt.seen("dev", a)  # forgotten: only the 2 most recent are kept
    assert filt.seen("dev", c)
    for dev in ("x", "y"):  # two more devices push "dev" out
        filt.seen(dev, b)
    assert not filt.seen("dev", c)

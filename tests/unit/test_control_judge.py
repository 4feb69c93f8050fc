"""The rollout judge: its tests agree with scipy, it promotes a better canary through the
waves, rolls back a worse one, and waits (never passes) when samples are too few."""

from __future__ import annotations

import json

import fastavro.validation
import numpy as np
import pytest
from scipy import stats

from edgeloop.agents.control.judge import (
    RolloutState,
    in_rollout,
    judge_window,
    membership_score,
    start,
)
from edgeloop.agents.control.settings import JudgeSettings
from edgeloop.agents.control.stats import mann_whitney, two_proportion
from edgeloop.schemas.catalog import get

US = 1_000_000
T0 = 1_800_000_000 * US
S = JudgeSettings()


def test_mann_whitney_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(0.3, 1, 70), 1)  # rounding makes many ties
    y = np.round(rng.normal(0.0, 1, 90), 1)
    ours = mann_whitney(x, y)
    for alt, p in (("greater", ours.p_greater), ("less", ours.p_less)):
        ref = stats.mannwhitneyu(x, y, alternative=alt, method="asymptotic")
        assert ours.u == ref.statistic
        assert p == pytest.approx(ref.pvalue, rel=1e-9)
    assert ours.shift == pytest.approx(np.median(np.subtract.outer(x, y)))


def test_two_proportion_z_matches_the_textbook_statistic():
    t = two_proportion(30, 200, 18, 220, 0.02)
    p = 48 / 420
    z = (30 / 200 - 18 / 220) / np.sqrt(p * (1 - p) * (1 / 200 + 1 / 220))
    assert t.z == pytest.approx(z)
    assert t.p_value == pytest.approx(stats.norm.sf(z))


def release(stage="CANARY", version=8, parent=7):
    return {
        "event_id": "e",
        "ts": T0,
        "model_name": "digits",
        "model_version": version,
        "cohort": "default",
        "stage": stage,
        "wave": 0,
        "artifact_url": f"http://store/digits/{version}",
        "manifest_sha256": f"{version:064x}",
        "target": "pi5-cpu",
        "parent_version": parent,
        "reason": "{}",
    }


class Model:
    """One edge model as the fleet sees it: its confidence, latency and error."""

    def __init__(self, conf_ab, wrong, latency_ms):
        self.conf_ab, self.wrong, self.latency_ms = conf_ab, wrong, latency_ms


def live_window(state, k, models, devices, rng, *, events_per_device=20):
    """One window of live traffic: each device runs the version the rollout gives it."""
    for d in devices:
        version = state.version if in_rollout(d, state, S) else state.parent_version
        m = models[version]
        arm = state.arm(version)
        for i in range(events_per_device):
            conf = float(rng.beta(*m.conf_ab))
            offload = conf < 0.6
            arm.add_event(f"{d}:{k}:{i}", conf, float(rng.gamma(4, m.latency_ms / 4)), offload)
            if offload or rng.random() < 0.05:
                arm.add_verdict(agree=rng.random() >= m.wrong * (1.5 - conf))


def roll(models, *, windows=12, devices=400, seed=0):
    state = start(release(), release("FULL", 7, 6), S)
    rng = np.random.default_rng(seed)
    ids = [f"pi-{i:04d}" for i in range(devices)]
    steps = []
    for k in range(windows):
        live_window(state, k, models, ids, rng)
        out, judgement = judge_window(T0 + (k + 1) * 60 * US, state, S)
        for r in out:
            fastavro.validation.validate(r, get("ModelRelease").parsed, raise_errors=True)
            steps.append((k, r, judgement))
        if state.done:
            break
    return state, steps


PARENT = Model((5, 2), wrong=0.20, latency_ms=20.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_better_canary_is_promoted_through_the_waves_to_full(seed):
    better = Model((6, 1.8), wrong=0.12, latency_ms=19.0)
    state, steps = roll({7: PARENT, 8: better}, seed=seed)
    assert [(r["stage"], r["wave"], r["model_version"]) for _, r, _ in steps] == [
        ("WAVE", 1, 8),
        ("FULL", 2, 8),
    ]
    reason = json.loads(steps[0][1]["reason"])
    assert reason["verdict"] == "PASS"
    assert {m["name"] for m in reason["metrics"]} == {
        "disagreement",
        "offload_rate",
        "confidence",
        "latency",
    }
    assert reason["share"] == S.wave_shares[0]
    assert state.stage == "FULL"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_worse_canary_is_rolled_back_to_its_parent(seed):
    worse = Model((3, 2), wrong=0.35, latency_ms=30.0)
    _, steps = roll({7: PARENT, 8: worse}, seed=seed)
    ((_, r, judgement),) = steps
    assert (r["stage"], r["model_version"], r["parent_version"]) == ("ROLLBACK", 7, 8)
    assert r["artifact_url"] == "http://store/digits/7"
    assert judgement.verdict == "FAIL"
    failed = {m.name for m in judgement.metrics if m.outcome == "FAIL"}
    assert {"disagreement", "confidence", "latency"} <= failed
    assert json.loads(r["reason"])["why"] == "judge failed the candidate"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_canary_only_worse_at_agreeing_with_the_teacher_is_rolled_back(seed):
    wrong_more = Model((5, 2), wrong=0.30, latency_ms=20.0)  # same confidence and speed
    _, steps = roll({7: PARENT, 8: wrong_more}, seed=seed)
    ((_, r, judgement),) = steps
    assert r["stage"] == "ROLLBACK"
    assert [m.name for m in judgement.metrics if m.outcome == "FAIL"] == ["disagreement"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_equivalent_canary_is_promoted_once_enough_evidence_accrued(seed):
    _, steps = roll({7: PARENT, 8: PARENT}, seed=seed)
    assert [r["stage"] for _, r, _ in steps] == ["WAVE", "FULL"]
    assert steps[-1][0] <= S.max_extensions


def test_too_few_samples_waits_and_never_passes():
    # 20 devices: the 5% canary is one device or none; the judge must extend, and after
    # max_extensions roll back rather than promote without evidence.
    better = Model((6, 1.8), wrong=0.12, latency_ms=19.0)
    _, steps = roll({7: PARENT, 8: better}, devices=20, windows=10)
    ((k, r, judgement),) = steps
    assert k == S.max_extensions  # windows 0..max_extensions-1 extended
    assert r["stage"] == "ROLLBACK"
    assert judgement.verdict == "INCONCLUSIVE"
    assert any("too few samples" in m.detail for m in judgement.metrics)
    assert "inconclusive after" in json.loads(r["reason"])["why"]


def test_a_replayed_window_and_a_restored_state_decide_the_same():
    better = Model((6, 1.8), wrong=0.12, latency_ms=19.0)
    state = start(release(), release("FULL", 7, 6), S)
    rng = np.random.default_rng(3)
    live_window(state, 0, {7: PARENT, 8: better}, [f"pi-{i}" for i in range(400)], rng)
    restored = RolloutState.from_json(json.loads(json.dumps(state.to_json())))
    a, _ = judge_window(T0 + 60 * US, state, S)
    b, _ = judge_window(T0 + 60 * US, restored, S)
    assert a == b
    assert a
    assert judge_window(T0 + 60 * US, state, S) == ([], None)


def test_membership_is_deterministic_and_canaries_stay_in_every_wave():
    devices = [f"pi-{i:05d}" for i in range(20_000)]
    state = start(release(), release("FULL", 7, 6), S)
    canary = {d for d in devices if in_rollout(d, state, S)}
    assert abs(len(canary) / len(devices) - S.canary_share) < 0.005
    state.stage, state.wave = "WAVE", 1
    wave = {d for d in devices if in_rollout(d, state, S)}
    assert canary < wave
    assert abs(len(wave) / len(devices) - S.wave_shares[0]) < 0.01
    assert membership_score("digits", 8, "pi-00001") == membership_score("digits", 8, "pi-00001")


def test_start_refuses_a_release_that_is_not_a_canary_of_that_parent():
    with pytest.raises(ValueError, match="CANARY"):
        start(release("FULL"), release("FULL", 7, 6), S)
    with pytest.raises(ValueError, match="parent release is v6"):
        start(release(), release("FULL", 6, 5), S)

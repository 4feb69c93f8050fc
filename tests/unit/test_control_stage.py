"""The control step glue (agents/control_stage.py): the control log -> signals, threshold
updates and training triggers, replayed as a crashed worker's successor replays it."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest

from edgeloop.agents.control.settings import (
    ControlSettings,
    SignalSettings,
    ThresholdSettings,
    TriggerSettings,
)
from edgeloop.agents.control_stage import (
    PACK_MAX_BYTES,
    SIGNALS_TOPIC,
    THRESHOLDS_TOPIC,
    TRIGGERS_TOPIC,
    ControlState,
    ControlStep,
    Output,
    capacity,
    decode,
    encode,
    manual,
    observation,
    pack,
    tick,
)
from edgeloop.agents.records import Raw

US = 1_000_000
T0 = 1_800_000_000 * US
COHORTS = ("north", "south")


def settings(**trig: Any) -> ControlSettings:
    return ControlSettings(
        signals=SignalSettings(window_s=2.0, allowed_lateness_s=0.0, reference_min_events=10),
        threshold=ThresholdSettings(cloud_capacity_per_s=5.0),
        triggers=TriggerSettings(**{"hard_examples": 5, "debounce_s": 0, **trig}),
    )


def inference(device: str, cohort: str, ts: int, confidence: float) -> dict[str, Any]:
    rec = {
        "event_id": f"{device}:{ts}", "device_id": device, "cohort": cohort, "ts": ts,
        "model_version": 1,
        "confidence": confidence, "decision": "OFFLOAD" if confidence < 0.8 else "LOCAL",
        "latency": {"preprocess_us": 100, "inference_us": 900, "decision_us": 10},
    }  # fmt: skip
    obs = observation("edgeloop.v1.InferenceEvent", rec, Raw(b"", None, "t", 0, 0))
    assert obs is not None
    return obs


def scripted_log(windows: int = 6) -> list[dict[str, Any]]:
    """Two cohorts of two devices, 40 events per device and window, most of them below
    the factory tau 0.8: far more offloads than the 5/s capacity allows."""
    log: list[dict[str, Any]] = []
    for w in range(windows):
        for i in range(40):
            ts = T0 + w * 2 * US + i * 40_000
            for n, cohort in enumerate(COHORTS):
                for d in range(2):
                    conf = ((i * 7 + n * 3 + d) % 20) / 20 + 0.01
                    log.append(inference(f"{cohort}-{d}", cohort, ts, conf))
        log.append(tick(T0 + (w + 1) * 2 * US))
    return log


def run(step: ControlStep, log: list[dict[str, Any]], state: ControlState,
        start: int = 0) -> list[Output]:  # fmt: skip
    out: list[Output] = []
    for offset in range(start, len(log)):
        out.extend(step.apply(decode(encode(log[offset])), offset, state))
    return out


def snapshot(state: ControlState) -> ControlState:
    return ControlState.from_json(json.loads(json.dumps(state.to_json())))


def test_overloaded_cohorts_get_versioned_threshold_updates_from_closed_windows() -> None:
    out = run(ControlStep(settings()), scripted_log(), ControlState())
    signals = [r for t, _, r in out if t == SIGNALS_TOPIC]
    updates = [r for t, _, r in out if t == THRESHOLDS_TOPIC]
    assert {r["scope"] for r in signals} == {"DEVICE", "COHORT", "FLEET"}
    assert len({r["event_id"] for r in signals}) == len(signals)
    cohort_updates = [u for u in updates if u["scope"] == "COHORT"]
    assert {u["scope_id"] for u in cohort_updates} == set(COHORTS)
    # The budget forces tau down from the factory 0.8 in the first decision.
    first = {u["scope_id"]: u for u in reversed(cohort_updates)}
    assert all(u["tau"] < 0.8 for u in first.values())
    for cohort in COHORTS:
        versions = [u["threshold_version"] for u in cohort_updates if u["scope_id"] == cohort]
        assert versions == sorted(set(versions))  # strictly increasing per scope


def test_a_replay_from_an_older_snapshot_yields_the_same_records_and_no_lower_version() -> None:
    """A worker killed after producing but before its state reached the changelog: its
    successor restores the older state and replays the log from there."""
    log, step = scripted_log(), ControlStep(settings())
    state = ControlState()
    cut = len(log) // 2
    first = run(step, log[:cut], state)
    older = snapshot(state)
    rest = run(step, log, state, start=cut)
    # the successor: older state, replays from an earlier committed offset
    replayed_state = snapshot(older)
    replayed = run(step, log, replayed_state, start=cut - 50)
    assert replayed == rest  # records below the state's offset are skipped, not recounted
    versions: dict[str, int] = {}
    for topic, key, rec in first + rest + replayed:
        if topic == THRESHOLDS_TOPIC:
            assert rec["threshold_version"] >= versions.get(key, 0)
            versions[key] = rec["threshold_version"]


def test_applying_a_record_twice_counts_it_once() -> None:
    step, state = ControlStep(settings()), ControlState()
    obs = inference("north-0", "north", T0, 0.3)
    step.apply(obs, 0, state)
    assert step.apply(obs, 0, state) == []
    out = step.apply(tick(T0 + 10 * US), 1, state)
    device = next(r for t, _, r in out if t == SIGNALS_TOPIC and r["scope"] == "DEVICE")
    assert device["values"]["events"] == 1.0


def test_a_verdict_joins_its_request_and_one_without_request_is_ignored() -> None:
    step, state = ControlStep(settings()), ControlState()
    raw = Raw(b"", None, "t", 0, 0)
    req = observation(
        "edgeloop.v1.OffloadRequest",
        {"event_id": "r1", "cohort": "north", "confidence": 0.3, "reason": "OFFLOAD"},
        raw,
    )
    verdict = {"request_event_id": "r1", "device_id": "north-0", "ts": T0, "agree": False,
               "latency_ms": 12.0, "model_version": 1}  # fmt: skip
    orphan = {**verdict, "request_event_id": "nobody"}
    log = [req, observation("edgeloop.v1.CloudVerdict", verdict, raw),
           observation("edgeloop.v1.CloudVerdict", orphan, raw), tick(T0 + 10 * US)]  # fmt: skip
    out = run(step, [o for o in log if o is not None], state)
    cohort = next(r for t, _, r in out if t == SIGNALS_TOPIC and r["scope"] == "COHORT")
    assert cohort["values"]["verdicts"] == 1.0
    assert cohort["values"]["disagreement_rate"] == 1.0
    assert state.pending == {}


def hard(partition: int, offset: int) -> dict[str, Any]:
    rec = {"model_version": 1, "ts": T0 + offset * US}
    obs = observation("edgeloop.v1.HardExample", rec, Raw(b"", None, "h", partition, offset))
    assert obs is not None
    return obs


def test_count_trigger_names_exact_ranges_and_the_same_id_after_a_replay() -> None:
    step = ControlStep(settings())
    log = [hard(0, 0), hard(1, 0), hard(0, 1), hard(1, 1), hard(0, 2), hard(1, 2)]
    state = ControlState()
    older = snapshot(state)
    out = run(step, log, state)
    triggers = [r for t, _, r in out if t == TRIGGERS_TOPIC]
    assert len(triggers) == 1
    assert triggers[0]["reason"] == "COUNT"
    assert triggers[0]["model_name"] == "digits-student"
    assert [
        (r["partition"], r["start_offset"], r["end_offset"]) for r in triggers[0]["ranges"]
    ] == [
        (0, 0, 3),
        (1, 0, 2),
    ]
    again = [r for t, _, r in run(step, log, older) if t == TRIGGERS_TOPIC]
    assert [r["trigger_id"] for r in again] == [triggers[0]["trigger_id"]]


def test_manual_trigger_covers_what_is_uncovered_once_per_request() -> None:
    step, state = ControlStep(settings(hard_examples=100)), ControlState()
    log = [hard(0, 0), hard(0, 1), manual("req-1", T0 + 5 * US), manual("req-1", T0 + 6 * US)]
    triggers = [r for t, _, r in run(step, log, state) if t == TRIGGERS_TOPIC]
    assert [r["reason"] for r in triggers] == ["MANUAL"]
    assert triggers[0]["hard_example_count"] == 2


def test_manual_trigger_before_any_hard_example_fires_nothing() -> None:
    step, state = ControlStep(settings()), ControlState()
    assert step.apply(manual("req-1", T0), 0, state) == []


def test_state_survives_the_changelog_round_trip() -> None:
    step, state = ControlStep(settings()), ControlState()
    run(step, [*scripted_log(3), hard(0, 0)], state)
    assert snapshot(state).to_json() == state.to_json()


def test_offload_lag_in_ticks_lowers_the_budget_the_controller_uses() -> None:
    def budgets(lag_s: float | None) -> list[float]:
        log = scripted_log(3)
        log = [tick(o["ts"], lag_s) if o["k"] == "tick" else o for o in log]
        out = run(ControlStep(settings()), log, ControlState())
        return [
            r["signals"]["effective_capacity_per_s"]
            for t, _, r in out
            if t == THRESHOLDS_TOPIC and r["scope"] == "COHORT"
        ]

    assert set(budgets(None)) == {5.0}
    # 60 s behind of a 120 s drain horizon halves the budget: C_eff = C (1 - 60 / 120).
    assert budgets(60.0)[-1] == 2.5


def test_fleet_signals_carry_the_hard_examples_no_trigger_covers_yet() -> None:
    step = ControlStep(settings(hard_examples=100))
    log = [inference("north-0", "north", T0, 0.3), hard(0, 0), hard(0, 1),
           tick(T0 + 10 * US)]  # fmt: skip
    out = run(step, log, ControlState())
    fleet = next(r for t, _, r in out if t == SIGNALS_TOPIC and r["scope"] == "FLEET")
    assert fleet["values"]["hard_examples_uncovered"] == 2.0


def release(stage: str, version: int, parent: int | None) -> dict[str, Any]:
    rec = {
        "model_name": "digits-student", "model_version": version, "cohort": "north",
        "stage": stage, "wave": 0, "artifact_url": f"store://v{version}",
        "manifest_sha256": f"sha{version}", "target": "pi5-cpu", "parent_version": parent,
    }  # fmt: skip
    obs = observation("edgeloop.v1.ModelRelease", rec, Raw(b"", None, "r", 0, 0))
    assert obs is not None
    return obs


def arm_log(version: int, n: int, confidence: float, disagree_every: int) -> list[dict[str, Any]]:
    """n events of `version` in window 0, each offloaded, each with its verdict."""
    raw, log = Raw(b"", None, "t", 0, 0), []
    for i in range(n):
        ts = T0 + i * 1000
        device = f"v{version}-{i % 4}"
        event = {**inference(device, "north", ts, confidence), "model_version": version,
                 "event_id": f"{device}:{i}", "decision": "OFFLOAD"}  # fmt: skip
        req = {"event_id": f"req-{version}-{i}", "cohort": "north",
               "confidence": confidence, "reason": "OFFLOAD"}  # fmt: skip
        verdict = {"request_event_id": f"req-{version}-{i}", "device_id": device, "ts": ts,
                   "agree": i % disagree_every != 0, "latency_ms": 10.0,
                   "model_version": version}  # fmt: skip
        log += [event, observation("edgeloop.v1.OffloadRequest", req, raw),
                observation("edgeloop.v1.CloudVerdict", verdict, raw)]  # fmt: skip
    return [o for o in log if o is not None]


def rollout(n: int, canary_confidence: float, canary_disagree_every: int) -> list[dict[str, Any]]:
    log = [release("FULL", 1, None), release("CANARY", 2, 1)]
    log += arm_log(1, n, 0.5, 10) + arm_log(2, n, canary_confidence, canary_disagree_every)
    log.append(tick(T0 + 10 * US))
    out = run(ControlStep(settings()), log, ControlState())
    return [r for t, _, r in out if t == "ml.model-releases.v1"]


def test_the_judge_rolls_back_a_worse_canary_to_its_parent() -> None:
    steps = rollout(200, 0.3, 2)  # half its verdicts disagree (control: one in ten)
    assert [(r["stage"], r["model_version"], r["share"]) for r in steps] == [("ROLLBACK", 1, 1.0)]
    assert steps[0]["artifact_url"] == "store://v1"
    assert "judge failed" in steps[0]["reason"]


def test_the_judge_promotes_a_better_canary_to_the_first_wave() -> None:
    steps = rollout(200, 0.5, 50)
    assert [(r["stage"], r["model_version"], r["share"]) for r in steps] == [("WAVE", 2, 0.25)]


def test_the_judge_waits_when_samples_are_too_few() -> None:
    assert rollout(10, 0.3, 2) == []


def cohort_updates(out: list[Output]) -> list[dict[str, Any]]:
    return [r for t, _, r in out if t == THRESHOLDS_TOPIC and r["scope"] == "COHORT"]


def with_capacity(per_s: float | None, after_window: int, windows: int = 6) -> list[dict[str, Any]]:
    """The scripted log with an operator's capacity appended after window `after_window`'s
    closing tick (as `edgeloop control capacity` appends it)."""
    log = scripted_log(windows)
    ticks = [i for i, o in enumerate(log) if o["k"] == "tick"]
    at = ticks[after_window] + 1
    return [*log[:at], capacity(per_s, T0 + (after_window + 1) * 2 * US + 1), *log[at:]]


def test_a_capacity_override_is_used_from_the_next_window_end() -> None:
    # The workers' setting is 5/s (settings()); the operator halves it after window 2.
    out = run(ControlStep(settings()), with_capacity(2.5, 2), ControlState())
    decided = {u["threshold_version"]: u for u in cohort_updates(out)}
    ends = sorted({v // 4 for v in decided})
    first_after = (T0 + 3 * 2 * US) // 1000  # window 2 closed before the record
    for version, u in decided.items():
        overridden = version // 4 > first_after
        assert u["signals"]["capacity_per_s"] == (2.5 if overridden else 5.0)
        assert u["signals"]["capacity_override"] == float(overridden)
        assert ("override" in u["reason"]) == overridden
    # The first window after it is decided on the new budget: over it, tau forced down
    # until the cohorts' load fits (the settling bound of a capacity cut).
    assert any(e > first_after for e in ends)
    cut = [u for u in decided.values() if u["threshold_version"] // 4 > first_after]
    assert cut and all(u["reason"].startswith("over budget") for u in cut[:2])
    assert min(u["signals"]["fleet_load_after_per_s"] for u in cut) <= 2.5
    fleet = [r for t, _, r in out if t == SIGNALS_TOPIC and r["scope"] == "FLEET"]
    assert [r["values"].get("capacity_override_per_s") for r in fleet][-1] == 2.5
    assert fleet[0]["values"]["capacity_per_s"] == 5.0
    assert "capacity_override_per_s" not in fleet[0]["values"]


def test_a_capacity_override_survives_a_crash_and_a_replay_yields_the_same_state() -> None:
    log, step = with_capacity(2.5, 2), ControlStep(settings())
    cap_at = next(i for i, o in enumerate(log) if o["k"] == "cap")
    state = ControlState()
    first = run(step, log[: cap_at + 3], state)
    # The changelog holds the state after the override; a successor restores it.
    restored = snapshot(state)
    assert restored.capacity == {"per_s": 2.5, "ts": log[cap_at]["ts"], "offset": cap_at}
    rest = run(step, log, state, start=cap_at + 3)
    again = run(step, log, restored, start=cap_at - 10)  # redelivered from before it
    assert again == rest
    assert restored.to_json() == state.to_json()
    # The whole log replayed from nothing (a new worker, an empty changelog): same again.
    fresh = ControlState()
    assert run(step, log, fresh) == first + rest
    assert fresh.to_json() == state.to_json()


def test_clearing_the_override_returns_to_the_setting() -> None:
    log = with_capacity(2.5, 1, windows=8)
    ticks = [i for i, o in enumerate(log) if o["k"] == "tick"]
    at = ticks[4] + 1
    log = [*log[:at], capacity(None, T0 + 10 * US + 1), *log[at:]]
    state = ControlState()
    out = run(ControlStep(settings()), log, state)
    assert state.capacity is None
    fleet = [r["values"] for t, _, r in out if t == SIGNALS_TOPIC and r["scope"] == "FLEET"]
    assert fleet[-1]["capacity_per_s"] == 5.0
    assert "capacity_override_per_s" not in fleet[-1]
    assert any("capacity_override_per_s" in v for v in fleet)


def test_a_bad_capacity_is_refused_and_changes_nothing() -> None:
    step, state = ControlStep(settings()), ControlState()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        try:
            capacity(bad, T0)
        except ValueError:
            pass
        else:
            raise AssertionError(f"capacity({bad}) accepted")
        obs = {"k": "cap", "per_s": bad, "ts": T0}
        try:
            step.apply(obs, state.offset + 1, state)
        except ValueError:
            pass
        else:
            raise AssertionError(f"a {bad} capacity record applied")
        assert state.capacity is None


def test_the_offload_backlog_is_timed_at_the_capacity_in_force() -> None:
    """Ticks carry the messages behind; the step divides by the capacity in force, so an
    override changes the lag (seconds to drain) as well as the budget."""

    def lags(log: list[dict[str, Any]]) -> tuple[set[float], list[float]]:
        log = [tick(o["ts"], behind=300) if o["k"] == "tick" else o for o in log]
        out = run(ControlStep(settings()), log, ControlState())
        fleet = [r["values"] for t, _, r in out if t == SIGNALS_TOPIC and r["scope"] == "FLEET"]
        budgets = [u["signals"]["effective_capacity_per_s"] for u in cohort_updates(out)]
        return {v["offload_lag_s"] for v in fleet if "offload_lag_s" in v}, budgets

    # 300 behind at 5/s: 60 s of a 120 s horizon, C_eff = 5 (1 - 60/120) = 2.5.
    at_setting, budgets = lags(scripted_log(3))
    assert at_setting == {60.0}
    assert budgets[-1] == 2.5
    # At an override of 10/s the same backlog drains in 30 s.
    at_override, _ = lags([capacity(10.0, T0), *scripted_log(3)])
    assert at_override == {30.0}


def status(device: str, cohort: str, ts: int, capacity_bytes: float | None) -> dict[str, Any]:
    from edgeloop.schemas.catalog import get
    from edgeloop.schemas.samples import example_record

    rec = {**example_record(get("DeviceStatus"), seed=1), "device_id": device, "cohort": cohort,
           "ts": ts, "uplink_bytes_per_s": 10.0,
           "uplink_capacity_bytes_per_s": capacity_bytes, "rtt_ms": 5.0}  # fmt: skip
    obs = observation("edgeloop.v1.DeviceStatus", rec, Raw(b"", None, "s", 0, 0))
    assert obs is not None
    return obs


def test_a_declared_uplink_capacity_reaches_the_controller_through_the_log() -> None:
    """DeviceStatus -> control-log observation -> DEVICE window -> the device's override:
    north-0 declares 8 KiB/s (half of it is one 4 KiB offload per second), north-1
    declares none; both send almost nothing (`uplink_bytes_per_s` 10 B/s)."""
    log = []
    for o in scripted_log(6):
        if o["k"] == "tick":
            ts = int(o["ts"]) - US
            log += [status("north-0", "north", ts, 8192.0), status("north-1", "north", ts, None)]
        log.append(o)
    out = run(ControlStep(settings()), log, ControlState())
    devices = [r for t, _, r in out if t == THRESHOLDS_TOPIC and r["scope"] == "DEVICE"]
    assert {u["scope_id"] for u in devices} == {"north-0"}
    assert all(u["signals"]["uplink_capacity_bytes_per_s"] == 8192.0 for u in devices)
    assert all(u["reason"].startswith("uplink budget") for u in devices)
    # Within its budget: its offloads at the tau it was given fit in 1 offload/s.
    signals = {(r["scope_id"], r["window_end"]): r["values"] for t, _, r in out
               if t == SIGNALS_TOPIC and r["scope"] == "DEVICE"}  # fmt: skip
    last = devices[-1]
    values = next(v for (d, _), v in sorted(signals.items(), reverse=True) if d == "north-0")
    k = round(last["tau"] * 20)
    offloads = sum(values[f"conf_{b:02d}"] for b in range(k)) / values["window_s"]
    assert offloads + last["audit_rate"] * (values["events_per_s"] - offloads) <= 1.0


def with_teacher(
    log: list[dict[str, Any]], from_window: int, **sample: float
) -> list[dict[str, Any]]:
    """The log with each tick from window `from_window` on carrying one worker's teacher
    measurement (as the control app's timer writes it) and its offload backlog."""
    from edgeloop.agents.teacher_rate import RateSample

    behind = int(sample.pop("behind"))
    out, w = [], 0
    for rec in log:
        obs = rec
        if obs["k"] == "tick":
            if w >= from_window:
                obs = tick(obs["ts"], behind=behind, worker="host:1", teacher=RateSample(
                    per_s=sample["per_s"], wall_per_s=sample["wall_per_s"],
                    busy=sample["busy"], items=100,
                    service_p99_s=sample.get("service_p99_s", 0.0),
                ))  # fmt: skip
            w += 1
        out.append(obs)
    return out


def fleet_values(out: list[Output]) -> list[dict[str, float]]:
    return [r["values"] for t, _, r in out if t == SIGNALS_TOPIC and r["scope"] == "FLEET"]


def test_a_saturated_teacher_measures_the_capacity_the_controller_uses() -> None:
    # The setting says 5/s; the worker's verdict stage is busy 95% of its span with 500
    # offloads waiting and answers 3/s: the teacher's capacity is 3/s, from window 2 on.
    log = with_teacher(scripted_log(), 2, per_s=4.0, wall_per_s=3.0, busy=0.95, behind=500)
    state = ControlState()
    out = run(ControlStep(settings()), log, state)
    fleet = fleet_values(out)
    assert [v["capacity_per_s"] for v in fleet] == [5.0, 5.0, 3.0, 3.0, 3.0, 3.0]
    assert "teacher_capacity_per_s" not in fleet[1]
    assert fleet[2]["teacher_capacity_per_s"] == 3.0 and fleet[2]["teacher_saturated"] == 1.0
    after = [u for u in cohort_updates(out) if u["signals"]["capacity_per_s"] == 3.0]
    assert after and all("measured" in u["reason"] for u in after)
    # The measurement is in the changelog: a successor keeps using it.
    assert snapshot(state).teacher_capacity == {"per_s": 3.0, "ts": float(T0 + 6 * 2 * US)}


def test_an_idle_teacher_never_raises_the_capacity_over_the_setting() -> None:
    # Busy 10%, no backlog: 20 offloads per busy second is a lower bound of what the
    # teacher sustains, but the 5/s setting is also the cloud's ceiling: it stands.
    log = with_teacher(scripted_log(), 1, per_s=20.0, wall_per_s=1.0, busy=0.1, behind=0)
    fleet = fleet_values(run(ControlStep(settings()), log, ControlState()))
    assert {v["capacity_per_s"] for v in fleet} == {5.0}
    assert all(v["teacher_saturated"] == 0.0 for v in fleet[1:])


def test_a_measured_capacity_rises_with_what_the_teacher_proves_up_to_the_setting() -> None:
    # Saturated at 3/s in windows 0-1; then idle, proving 4/s (a faster teacher), then
    # 20/s: the capacity goes 3 -> 4 -> back to the 5/s setting.
    log = scripted_log(6)
    sat = with_teacher(log, 0, per_s=3.5, wall_per_s=3.0, busy=0.95, behind=500)
    four = with_teacher(log, 0, per_s=4.0, wall_per_s=1.0, busy=0.1, behind=0)
    twenty = with_teacher(log, 0, per_s=20.0, wall_per_s=1.0, busy=0.1, behind=0)
    ticks = [i for i, o in enumerate(log) if o["k"] == "tick"]
    mixed = [*sat[: ticks[1] + 1], *four[ticks[1] + 1 : ticks[3] + 1], *twenty[ticks[3] + 1 :]]
    fleet = fleet_values(run(ControlStep(settings()), mixed, ControlState()))
    assert [v["capacity_per_s"] for v in fleet] == [3.0, 3.0, 4.0, 4.0, 5.0, 5.0]


def test_a_busy_teacher_without_a_backlog_is_not_saturated() -> None:
    # Busy 95% of the span but nothing waiting (slow acknowledgements of small batches,
    # not a teacher at its limit): its 3/s is no capacity, and the setting stands.
    log = with_teacher(scripted_log(), 0, per_s=3.0, wall_per_s=3.0, busy=0.95, behind=0)
    fleet = fleet_values(run(ControlStep(settings()), log, ControlState()))
    assert {v["capacity_per_s"] for v in fleet} == {5.0}


def test_the_workers_service_time_reaches_the_fleet_signals_for_the_latency_slo() -> None:
    # The tick carries the worker's teacher service time p99 (batch handed to verdicts
    # acknowledged); the FLEET window carries it for the controller's latency SLO.
    log = with_teacher(scripted_log(), 1, per_s=4.0, wall_per_s=3.0, busy=0.5, behind=0,
                       service_p99_s=0.25)  # fmt: skip
    state = ControlState()
    fleet = fleet_values(run(ControlStep(settings()), log, state))
    assert "teacher_service_p99_ms" not in fleet[0]
    assert all(v["teacher_service_p99_ms"] == 250.0 for v in fleet[1:])
    assert snapshot(state).teachers["host:1"]["service_p99_ms"] == 250.0


def run_packed(
    step: ControlStep, log: list[dict[str, Any]], state: ControlState, per_record: int
) -> list[Output]:
    """The log as the worker writes it: each source batch's observations packed."""
    out: list[Output] = []
    records = [
        value for i in range(0, len(log), per_record) for value in pack(log[i : i + per_record])
    ]
    for offset, value in enumerate(records):
        outputs, malformed = step.apply_record(decode(value), offset, state)
        assert malformed == 0
        out.extend(outputs)
    return out


def test_a_packed_log_yields_the_same_records_as_one_observation_per_record() -> None:
    log = scripted_log()
    single = run(ControlStep(settings()), log, ControlState())
    packed = run_packed(ControlStep(settings()), log, ControlState(), per_record=97)
    assert single and packed == single


def test_a_redelivered_packed_record_counts_nothing_twice() -> None:
    step, state = ControlStep(settings()), ControlState()
    record = decode(pack(scripted_log(windows=1))[0])
    first, _ = step.apply_record(record, 7, state)
    again, malformed = step.apply_record(record, 7, state)
    assert first and again == [] and malformed == 0
    assert state.offset == 7


def test_a_malformed_observation_in_a_packed_record_costs_only_itself() -> None:
    log = scripted_log(windows=2)
    broken = [*log[:5], {"k": "inf", "cohort": "north"}, {"k": "nope"}, *log[5:]]
    out, malformed = ControlStep(settings()).apply_record(
        decode(pack(broken)[0]), 0, ControlState()
    )
    assert malformed == 2
    assert out == run(ControlStep(settings()), log, ControlState())


def test_an_inference_observation_without_an_event_id_is_applied() -> None:
    """The first workers wrote inference observations without `event_id`: a control log
    replayed from its start still applies them."""
    log = scripted_log(windows=2)
    old = [{k: v for k, v in o.items() if k != "event_id"} if o["k"] == "inf" else o for o in log]
    out, malformed = ControlStep(settings()).apply_record(decode(pack(old)[0]), 0, ControlState())
    assert malformed == 0
    assert out == run(ControlStep(settings()), log, ControlState())


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda o: o.pop("latency_ms"), id="a field missing"),
        pytest.param(lambda o: o.update(rtt_ms=3.0), id="a field too many"),
        pytest.param(lambda o: o.update(id=o.pop("event_id")), id="a field renamed"),
    ],
)
def test_an_inference_observation_with_other_keys_is_malformed(
    change: Callable[[dict[str, Any]], object],
) -> None:
    log = scripted_log(windows=2)
    odd = inference("north-001", "north", 1, 0.9)
    change(odd)
    out, malformed = ControlStep(settings()).apply_record(
        decode(pack([*log[:5], odd, *log[5:]])[0]), 0, ControlState()
    )
    assert malformed == 1
    assert out == run(ControlStep(settings()), log, ControlState())


def test_packing_splits_a_large_batch_below_the_record_size_bound() -> None:
    log = scripted_log(windows=20)
    records = pack(log)
    assert len(records) > 1
    assert all(len(r) <= PACK_MAX_BYTES + 64 for r in records)
    assert [o for r in records for o in decode(r)["obs"]] == json.loads(json.dumps(log))


def test_a_dropped_manual_request_is_reported_with_its_reason() -> None:
    """`edgeloop train trigger` used to say "requested" for a request the agents dropped
    without a word: each drop now comes out of the step with why (too few uncovered hard
    examples, an id that already fired), for the worker to log and count."""
    step, state = ControlStep(settings(hard_examples=100, min_examples=3)), ControlState()
    log = [
        manual("early", T0),  # no hard example seen yet
        hard(0, 0), hard(0, 1),
        manual("two", T0 + 5 * US),  # 2 uncovered < min_examples 3
        hard(0, 2),
        manual("three", T0 + 6 * US),  # fires
        hard(0, 3), hard(0, 4), hard(0, 5),
        manual("three", T0 + 7 * US),  # the same id again
    ]  # fmt: skip
    fired = [r for t, _, r in run(step, log, state) if t == TRIGGERS_TOPIC]
    assert [r["detail"] for r in fired] == ["manual request three"]
    assert step.take_dropped() == [
        {"request_id": "early", "reason": "too_few_examples", "uncovered": 0, "min_examples": 3},
        {"request_id": "two", "reason": "too_few_examples", "uncovered": 2, "min_examples": 3},
        {"request_id": "three", "reason": "already_handled", "uncovered": 3, "min_examples": 3},
    ]
    assert step.take_dropped() == []  # taken once


def test_the_worker_logs_and_counts_each_dropped_manual_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prometheus_client import CollectorRegistry

    from edgeloop.agents.control_app import ControlMetrics, report_dropped

    step, state = ControlStep(settings()), ControlState()
    run(step, [manual("req-a", T0), manual("req-b", T0 + US)], state)
    registry = CollectorRegistry()
    with caplog.at_level(logging.WARNING):
        report_dropped(step.take_dropped(), ControlMetrics(registry))
    dropped = registry.get_sample_value(
        "edgeloop_control_trigger_requests_dropped_total", {"reason": "too_few_examples"}
    )
    assert dropped == 2
    lines = [r for r in caplog.records if r.getMessage() == "manual trigger request dropped"]
    assert [(r.request_id, r.reason) for r in lines] == [  # type: ignore[attr-defined]
        ("req-a", "too_few_examples"),
        ("req-b", "too_few_examples"),
    ]


@pytest.mark.parametrize("confidence", [float("nan"), float("inf"), -0.1, 1.5, 1e308])
def test_an_impossible_confidence_is_not_observed(confidence: float) -> None:
    """A NaN confidence stored in a canary's sample stopped every judge step after it; a
    confidence of 1e308 raised OverflowError and lost the control batch's outputs."""
    rec = {**inference("d-0", "north", T0, 0.5), "confidence": confidence}
    raw_rec = {
        "event_id": "d-0:1", "device_id": "d-0", "cohort": "north", "ts": T0,
        "model_version": 1, "confidence": confidence, "decision": "LOCAL",
        "latency": {"preprocess_us": 1, "inference_us": 2, "decision_us": 3},
    }  # fmt: skip
    with pytest.raises(ValueError, match="confidence"):
        observation("edgeloop.v1.InferenceEvent", raw_rec, Raw(b"", None, "t", 0, 0))
    # One already in the log (an older worker wrote it) costs only itself.
    log = scripted_log(windows=2)
    out, malformed = ControlStep(settings()).apply_record(
        decode(pack([*log[:3], rec, *log[3:]])[0]), 0, ControlState()
    )
    assert malformed == 1
    assert out == run(ControlStep(settings()), log, ControlState())


def test_an_impossible_round_trip_time_is_not_observed() -> None:
    status = {"device_id": "d-0", "cohort": "north", "ts": T0, "rtt_ms": 1e308,
              "uplink_bytes_per_s": 10.0, "outbox_depth": 0}  # fmt: skip
    with pytest.raises(ValueError, match="rtt_ms"):
        observation("edgeloop.v1.DeviceStatus", status, Raw(b"", None, "t", 0, 0))


def test_a_state_of_twenty_thousand_pending_requests_fits_its_changelog_record() -> None:
    """20,000 unanswered offloads (the default `max_pending_requests`, e.g. with verdicts
    off) made a 1.26 MB state: Faust's producer refused it and crashed the worker."""
    from edgeloop.agents.control_app import STATE_MAX_BYTES, dump_state, load_state

    step, state = ControlStep(settings()), ControlState()
    for i in range(20_000):
        req = {"k": "req", "id": f"pi5-fleet-{i % 850:04d}:offload:{i:016d}",
               "cohort": COHORTS[i % 2],
               "confidence": (i % 100) / 100, "reason": "OFFLOAD"}  # fmt: skip
        step.apply(req, i, state)
    doc = state.to_json()
    assert len(json.dumps(doc, separators=(",", ":"))) > 1_000_000  # the old record
    value = dump_state(doc)
    assert len(value) < STATE_MAX_BYTES
    assert ControlState.from_json(load_state(value)).to_json() == doc
    # A state an older worker wrote (plain JSON) still loads.
    assert load_state(json.dumps(doc).encode()) == json.loads(json.dumps(doc))


def test_a_state_over_its_record_limit_forgets_its_oldest_pending_requests() -> None:
    """Before, such a state was not written at all, batch after batch: a restart lost
    every record applied since. Now the oldest pending requests go until it fits."""
    import asyncio
    import random
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from edgeloop.agents.control_app import STATE_KEY, STATE_MAX_BYTES, ControlAgents, load_state

    async def produce(outs: Any) -> None:
        return None

    book = SimpleNamespace(encode=lambda topic, rec: b"x")
    ctx = SimpleNamespace(book=book, produce=produce, settings=SimpleNamespace(app_id="app"),
                          metrics=SimpleNamespace(registry=CollectorRegistry()))  # fmt: skip
    table: dict[bytes, bytes] = {}
    agents = ControlAgents(ctx, ControlSettings(wiring={"max_pending_requests": 10**6}), table)  # type: ignore[arg-type]
    agents.ready.set()
    state = ControlState()
    rng = random.Random(1)
    for _ in range(40_000):  # random ids: ~1 MB compressed, over the limit
        state.pending[f"{rng.getrandbits(128):032x}"] = ["north", rng.random(), "OFFLOAD"]
    newest = list(state.pending)[-1]
    agents._state = state
    asyncio.run(agents.control([Raw(encode(tick(T0, 1.0)), b"control", "app-control-log", 0, 5)]))
    assert len(table[STATE_KEY]) <= STATE_MAX_BYTES
    written = ControlState.from_json(load_state(table[STATE_KEY]))
    assert written.offset == 5
    assert 0 < len(written.pending) < 40_000 and newest in written.pending
    assert written.pending_forgotten == 40_000 - len(written.pending)
    assert agents.metrics.state_too_large._value.get() == 0


def test_a_capacity_too_small_to_drain_a_backlog_is_refused_from_any_writer() -> None:
    """1e-320 offloads/s made the backlog's drain time inf in the FLEET signal and the
    changelog; the CLI refused it, but a record from any other writer and the setting
    did not."""
    from pydantic import ValidationError

    with pytest.raises(ValueError, match="below"):
        ControlStep(settings()).apply({"k": "cap", "per_s": 1e-320, "ts": T0}, 0, ControlState())
    with pytest.raises(ValidationError):
        ControlSettings(threshold=ThresholdSettings(cloud_capacity_per_s=1e-320))

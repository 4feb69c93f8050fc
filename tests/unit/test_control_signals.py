"""Stream signal windows: what lands in which window, late events, PSI, replay."""

from __future__ import annotations

import json

import fastavro.validation
import numpy as np
import pytest

from edgeloop.agents.control.histograms import latency_quantile, psi
from edgeloop.agents.control.settings import SignalSettings, ThresholdSettings
from edgeloop.agents.control.signals import (
    InferenceObs,
    LagObs,
    SignalState,
    StatusObs,
    VerdictObs,
    bucket_key,
    observe,
    tick,
)
from edgeloop.agents.control.threshold import ControllerState, WindowInputs, step
from edgeloop.schemas.catalog import get

S = SignalSettings(window_s=60, allowed_lateness_s=30, buckets=20, reference_min_events=100)
US = 1_000_000
T0 = 1_800_000_000 * US  # window-aligned


def inference(ts_s, *, device="pi-1", cohort="lab", conf=0.9, decision="LOCAL", lat_ms=10.0):
    return InferenceObs(device, cohort, T0 + int(ts_s * US), 3, conf, decision, lat_ms)


def run(observations, state):
    out = []
    for o in observations:
        out.extend(observe(o, state, S))
    return out


def test_a_window_closes_after_its_lateness_and_a_later_event_is_counted_and_dropped():
    state = SignalState(scopes=["DEVICE", "COHORT", "FLEET"])
    first = [inference(s) for s in (1, 2, 59)]
    assert run(first, state) == []
    # 20 s into the next window: window 0 is still open for late events (lateness 30 s).
    assert run([inference(80), inference(30)], state) == []
    # 90 s: window 0's end + lateness has passed; it closes, for every scope, once.
    closed = run([inference(90)], state)
    assert [(r["scope"], r["scope_id"]) for r in closed] == [
        ("COHORT", "lab"),
        ("DEVICE", "pi-1"),
        ("FLEET", "fleet"),
    ]
    assert {r["values"]["events"] for r in closed} == {4.0}  # 1, 2, 59 and the late 30
    # An event for window 0 now is late: dropped, and counted in the next window.
    assert run([inference(10)], state) == []
    assert state.late_total == 3  # one per scope
    later = tick(T0 + 200 * US, state, S)
    assert {r["values"]["events"] for r in later} == {2.0}  # 80 and 90, not the late one
    assert {r["values"]["late_dropped"] for r in later} == {1.0}
    for r in closed + later:
        fastavro.validation.validate(r, get("StreamSignal").parsed, raise_errors=True)


def test_rates_quantiles_and_verdict_sums_are_what_the_window_saw():
    state = SignalState(scopes=["COHORT"])
    rng = np.random.default_rng(3)
    lat = rng.lognormal(np.log(20), 0.5, 2000)
    obs = []
    for i, ms in enumerate(lat):
        conf = 0.3 if i % 10 == 0 else 0.95
        decision = "OFFLOAD" if conf < 0.5 else ("AUDIT" if i % 50 == 1 else "LOCAL")
        obs.append(inference(i * 0.02, conf=conf, decision=decision, lat_ms=float(ms)))
    # 200 offloads answered (20 wrong), 36 audits answered at audit rate 0.02 (2 wrong).
    for i in range(200):
        obs.append(VerdictObs("pi-1", "lab", T0 + i * 1000, 0.3, "OFFLOAD", i % 10 != 0, 80.0, 1.0))
    for i in range(36):
        obs.append(VerdictObs("pi-1", "lab", T0 + i * 1000, 0.95, "AUDIT", i > 1, 120.0, 0.02))
    obs.append(StatusObs("pi-1", "lab", T0 + 5 * US, 42.0, 5e4, 7))
    run(obs, state)
    (rec,) = tick(T0 + 100 * US, state, S)
    v = rec["values"]
    assert v["offload_rate"] == pytest.approx(0.1)
    assert v["audit_rate"] == pytest.approx(40 / 1800)  # i % 50 == 1: 40 audits
    assert v["offloads_per_s"] == pytest.approx(200 / 60)
    for q, name in ((0.5, "latency_p50_ms"), (0.99, "latency_p99_ms")):
        assert v[name] == pytest.approx(np.quantile(lat, q), rel=0.1)
    b_lo, b_hi = 6, 19  # buckets of 0.3 and 0.95
    assert v[bucket_key("disagree", b_lo)] == pytest.approx(0.1)
    assert v[bucket_key("vw", b_hi)] == pytest.approx(36 / 0.02)  # audits stand for 1800
    assert v[bucket_key("vwy", b_hi)] == pytest.approx(2 / 0.02)
    assert v["uplink_bytes_per_s"] == 5e4
    assert v["outbox_depth"] == 7
    assert rec["sample_count"] == 2000 + 236 + 1


def test_psi_against_the_release_reference_flags_a_shift_and_not_noise():
    rng = np.random.default_rng(5)

    def window(k, confs):
        return [inference(k * 60 + i * 0.01, conf=float(c)) for i, c in enumerate(confs)]

    state = SignalState(scopes=["COHORT"])
    ref = np.histogram(rng.beta(6, 1.5, 5000), bins=20, range=(0, 1))[0]
    state.references["3"] = [float(x) for x in ref]  # recorded with release v3
    obs = window(0, rng.beta(6, 1.5, 3000)) + window(1, rng.beta(2, 2, 3000))
    out = run(obs, state) + tick(T0 + 500 * US, state, S)
    same, shifted = (r["values"]["confidence_psi"] for r in out)
    assert same < 0.1
    assert shifted > 0.25
    assert out[0]["values"]["psi_model_version"] == 3.0


def test_without_a_recorded_reference_the_first_full_window_becomes_it():
    state = SignalState(scopes=["FLEET"])
    confs = np.random.default_rng(1).beta(6, 1.5, 300)
    run([inference(i * 0.1, conf=float(c)) for i, c in enumerate(confs)], state)
    (rec,) = tick(T0 + 200 * US, state, S)
    assert rec["values"]["psi_reference_bootstrapped"] == 1.0
    assert rec["values"]["confidence_psi"] == pytest.approx(0.0, abs=1e-9)
    assert "3" in state.references


def test_replaying_the_same_input_after_a_restore_yields_the_same_records():
    rng = np.random.default_rng(2)
    obs = [
        inference(float(t), device=f"pi-{i % 3}", conf=float(c), lat_ms=5.0)
        for i, (t, c) in enumerate(
            zip(np.sort(rng.uniform(0, 400, 3000)), rng.beta(5, 2, 3000), strict=True)
        )
    ] + [LagObs(T0 + 130 * US, 4.5)]
    obs.sort(key=lambda o: o.ts_us)
    straight = SignalState(scopes=["DEVICE", "COHORT", "FLEET"])
    a = run(obs, straight) + tick(T0 + 1000 * US, straight, S)
    restored = SignalState(scopes=["DEVICE", "COHORT", "FLEET"])
    b = run(obs[:1500], restored)
    restored = SignalState.from_json(json.loads(json.dumps(restored.to_json())))
    b += run(obs[1500:], restored) + tick(T0 + 1000 * US, restored, S)
    assert a == b
    assert len({r["event_id"] for r in a}) == len(a)
    assert any(r["values"].get("offload_lag_s") == 4.5 for r in a)


def test_the_controller_reads_what_the_aggregator_writes():
    state = SignalState(scopes=["COHORT"])
    confs = np.random.default_rng(4).beta(4, 1.5, 2000)
    run([inference(i * 0.025, conf=float(c)) for i, c in enumerate(confs)], state)
    (rec,) = tick(T0 + 200 * US, state, S)
    updates = step(
        WindowInputs(rec["window_end"], {"lab": rec["values"]}),
        ControllerState(),
        ThresholdSettings(),
        S.buckets,
    )
    assert [u["scope_id"] for u in updates] == ["lab"]
    assert updates[0]["signals"]["cohort_load_per_s"] > 0


def test_histogram_helpers():
    assert psi([10, 10], [10, 10], 1e-4) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="differ in buckets"):
        psi([1, 2, 3], [1, 2], 1e-4)
    assert np.isnan(latency_quantile([0] * 88, 0.5))


def test_observations_read_the_records_the_schemas_define():
    from edgeloop.schemas.samples import example_record

    event = example_record(get("InferenceEvent"), seed=1)
    obs = InferenceObs.from_record(event)
    lat = event["latency"]
    assert (
        obs.latency_ms == (lat["preprocess_us"] + lat["inference_us"] + lat["decision_us"]) / 1000
    )
    request = example_record(get("OffloadRequest"), seed=2) | {"reason": "AUDIT"}
    verdict = example_record(get("CloudVerdict"), seed=3) | {"agree": False}
    v = VerdictObs.from_records(request, verdict, audit_rate=0.05)
    assert (v.inclusion_prob, v.agree, v.ts_us) == (0.05, False, verdict["ts"])
    offload = VerdictObs.from_records(request | {"reason": "OFFLOAD"}, verdict, audit_rate=0.05)
    assert offload.inclusion_prob == 1.0
    status = StatusObs.from_record(example_record(get("DeviceStatus"), seed=4))
    assert status.outbox_depth >= 0


def test_a_device_window_carries_the_newest_declared_uplink_capacity_and_no_other_does():
    state = SignalState(scopes=["DEVICE", "COHORT", "FLEET"])
    # Out of order: the newest by event time wins, and a later report without one clears it.
    obs = [
        StatusObs("pi-1", "lab", T0 + 20 * US, 40.0, 9e3, 0, uplink_capacity_bytes_per_s=1e5),
        StatusObs("pi-1", "lab", T0 + 10 * US, 40.0, 9e3, 0, uplink_capacity_bytes_per_s=5e4),
        StatusObs("pi-2", "lab", T0 + 10 * US, 40.0, 9e3, 0, uplink_capacity_bytes_per_s=7e4),
        StatusObs("pi-2", "lab", T0 + 30 * US, 40.0, 9e3, 0),
        inference(5, device="pi-3"),
    ]
    run(obs, state)
    closed = {(r["scope"], r["scope_id"]): r["values"] for r in tick(T0 + 100 * US, state, S)}
    assert closed["DEVICE", "pi-1"]["uplink_capacity_bytes_per_s"] == 1e5
    assert closed["DEVICE", "pi-1"]["statuses"] == 2.0
    assert "uplink_capacity_bytes_per_s" not in closed["DEVICE", "pi-2"]
    assert closed["DEVICE", "pi-2"]["statuses"] == 2.0
    assert "statuses" not in closed["DEVICE", "pi-3"]  # no report: the controller keeps its own
    for scope in (("COHORT", "lab"), ("FLEET", "fleet")):
        assert "uplink_capacity_bytes_per_s" not in closed[scope]
    # From the record: an older device's status has no such field.
    from edgeloop.schemas.samples import example_record

    record = example_record(get("DeviceStatus"), seed=4)
    record.pop("uplink_capacity_bytes_per_s", None)
    assert StatusObs.from_record(record).uplink_capacity_bytes_per_s is None
    declared = {**record, "uplink_capacity_bytes_per_s": 2048.0}
    assert StatusObs.from_record(declared).uplink_capacity_bytes_per_s == 2048.0


def test_a_slow_fleet_gets_a_reference_from_its_first_windows_and_then_sees_the_drift():
    # 600 events per 60 s window, reference_min_events 1500: no single window is enough.
    # The first three windows (1800 events) of v3 become the reference, and a cohort whose
    # confidence then shifts shows a PSI over 0.25 while the clean one stays under it.
    settings = S.model_copy(update={"reference_min_events": 1500})
    rng = np.random.default_rng(7)
    state = SignalState(scopes=["COHORT", "FLEET"])
    out = []
    for k in range(8):
        for i in range(300):
            t = k * 60 + i * 0.2
            north = rng.beta(6, 1.5)
            south = rng.beta(2, 2) if k >= 5 else rng.beta(6, 1.5)
            for o in (
                inference(t, cohort="north", conf=float(north)),
                inference(t + 0.1, cohort="south", conf=float(south)),
            ):
                out.extend(observe(o, state, settings))
    out += tick(T0 + 2000 * US, state, settings)
    fleet = [
        r["values"].get("psi_reference_bootstrapped", 0.0) for r in out if r["scope"] == "FLEET"
    ]
    assert fleet[:4] == [0.0, 0.0, 1.0, 0.0]
    cohort = {
        (r["scope_id"], r["window_start"]): r["values"] for r in out if r["scope"] == "COHORT"
    }

    def psi_of(name: str, windows: range) -> list[float]:
        return [cohort[(name, T0 + k * 60 * US)]["confidence_psi"] for k in windows]

    assert max(psi_of("south", range(2, 5))) < 0.25 < min(psi_of("south", range(5, 8)))
    assert max(psi_of("north", range(2, 8))) < 0.25
    # No PSI before the reference exists: nothing to compare with.
    assert "confidence_psi" not in cohort[("south", T0 + 60 * US)]


def test_a_reference_being_summed_survives_a_restore_from_the_changelog():
    state = SignalState(scopes=["FLEET"])
    run([inference(i * 1.0, conf=0.9) for i in range(60)], state)
    tick(T0 + 100 * US, state, S)
    assert state.pending_references["3"] and not state.references
    restored = SignalState.from_json(state.to_json())
    run([inference(120 + i * 1.0, conf=0.9) for i in range(50)], restored)
    (rec,) = tick(T0 + 300 * US, restored, S)
    assert rec["values"]["psi_reference_bootstrapped"] == 1.0
    assert sum(restored.references["3"]) == 110


def test_the_changelog_value_holds_every_field_of_the_state():
    """`to_json` lists the fields by hand (asdict's deep copy cost 15 ms per control
    batch): a field added to the state and not to it would be lost on every restore."""
    from dataclasses import asdict

    rng = np.random.default_rng(3)
    obs = [
        inference(float(t), device=f"pi-{i % 3}", conf=float(c), lat_ms=5.0)
        for i, (t, c) in enumerate(
            zip(np.sort(rng.uniform(0, 200, 500)), rng.beta(5, 2, 500), strict=True)
        )
    ] + [LagObs(T0 + 130 * US, 4.5)]
    obs.sort(key=lambda o: o.ts_us)
    state = SignalState(scopes=["DEVICE", "COHORT", "FLEET"])
    run(obs, state)
    assert state.windows, "the case must have open windows"
    assert json.loads(json.dumps(state.to_json())) == json.loads(json.dumps(asdict(state)))

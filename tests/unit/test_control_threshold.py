"""The adaptive threshold controller, driven by a simulated fleet (tests/unit/control_sim.py).

The tests judge the controller by what the fleet would notice: offloads per second
against the teacher's capacity, lag, which cohorts' tau move, and the versions devices
receive. The bound they check, documented in docs/architecture.md ("Control plane"): a
capacity cut observed in window k is respected from window k + 1 on (SETTLE_WINDOWS = 2,
counting the window of the change).
"""

from __future__ import annotations

import itertools
import json
import math

import fastavro.validation
import numpy as np
import pytest

from edgeloop.agents.control.estimate import Evidence, error_estimates
from edgeloop.agents.control.settings import ThresholdSettings
from edgeloop.agents.control.signals import bucket_key
from edgeloop.agents.control.threshold import ControllerState, WindowInputs, scope_load, step
from edgeloop.schemas.catalog import get
from tests.unit.control_sim import T0, US, B, W, beta_pmf, calibrated_error, standard_fleet

SETTINGS = ThresholdSettings()
SETTLE_WINDOWS = 2  # the documented bound: the change's window and one more


def drive(fleet, windows, *, events=None, restore=False):
    """Run the closed loop; `events[w]` mutates the fleet before window w.

    Returns per-window (offered/s, lag_s, taus, audits, updates).
    """
    state = ControllerState()
    taus: dict[str, float] = {}
    audits: dict[str, float] = {}
    trace = []
    for w in range(windows):
        if events and w in events:
            events[w](fleet)
        result = fleet.run(taus, audits)
        if restore:  # a crash: the state comes back from its changelog (JSON)
            state = ControllerState.from_json(json.loads(json.dumps(state.to_json())))
        updates = step(result.inputs, state, SETTINGS, B)
        for u in updates:
            taus[u["scope_id"]] = u["tau"]
            audits[u["scope_id"]] = u["audit_rate"]
        trace.append((result, dict(taus), dict(audits), updates))
    return trace


@pytest.mark.parametrize("capacity", [20.0, 40.0])
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_halving_capacity_is_respected_within_the_documented_windows(seed, capacity):
    fleet = standard_fleet(capacity=capacity, seed=seed)
    change, half = 20, capacity / 2

    def halve(f):
        f.capacity = half

    trace = drive(fleet, 40, events={change: halve})
    before = [r.offered_per_s for r, *_ in trace[10:change]]
    # Before: the controller uses the capacity it has (not a trivially low tau).
    assert min(before) > 0.6 * capacity
    assert max(before) <= capacity
    # The window of the change itself runs on the old tau: it overloads the teacher.
    assert trace[change][0].offered_per_s > half
    # From the second window on, the fleet offers no more than the new capacity ...
    after = [r.offered_per_s for r, *_ in trace[change + SETTLE_WINDOWS - 1 :]]
    assert max(after) <= half, after
    # ... still uses much of it, and the backlog of the change window drains: the lag
    # falls every window (C_eff leaves the teacher room) and is gone within 3 windows.
    assert min(after) > 0.4 * half
    lags = [r.lag_s for r, *_ in trace[change:]]
    assert lags[0] > 0
    assert all(b < a or b == 0.0 for a, b in itertools.pairwise(lags))
    assert all(lag == 0.0 for lag in lags[4:])
    # The cut lowered every cohort's tau at once, with the reason and the evidence.
    cut = trace[change][3]
    assert {u["scope_id"] for u in cut} == {"indoor", "outdoor", "night"}
    assert all(u["reason"].startswith("over budget") for u in cut)
    assert all(u["signals"]["capacity_per_s"] == half for u in cut)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_deep_cut_is_respected_at_once_not_one_max_step_at_a_time(seed):
    # 60/s -> 10/s needs tau to fall by more than max_step: a decrease the budget forces
    # is applied in full, so the bound holds for any cut, not only for small ones.
    def cut(f):
        f.capacity = 10.0

    trace = drive(standard_fleet(capacity=60.0, seed=seed), 32, events={20: cut})
    assert max(r.offered_per_s for r, *_ in trace[21:]) <= 10.0
    # The big backlog of the cut window drains (C_eff holds the load down meanwhile).
    assert trace[20][0].lag_s > 100.0
    assert all(r.lag_s == 0.0 for r, *_ in trace[27:])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_restored_capacity_is_used_again_within_the_step_bound(seed):
    def halve(f):
        f.capacity = 10.0

    def restore(f):
        f.capacity = 20.0

    trace = drive(standard_fleet(capacity=20.0, seed=seed), 40, events={20: halve, 30: restore})
    low = trace[29][1]
    high = trace[39][1]
    # Raising is voluntary: at most max_step per window, so it takes
    # ceil(max rise / max_step) windows after the window that saw the capacity.
    rise = max(high[n] - low[n] for n in high)
    bound = math.ceil(rise / SETTINGS.max_step - 1e-9)
    assert rise > 0
    assert trace[30 + bound][1] == high
    offered = [r.offered_per_s for r, *_ in trace[31 + bound :]]
    assert min(offered) > 0.6 * 20.0
    assert max(offered) <= 20.0


@pytest.mark.parametrize("capacity", [20.0, 40.0, 60.0])
@pytest.mark.parametrize("seed", range(1, 11))
def test_constant_signals_settle_and_then_never_change_tau(seed, capacity):
    trace = drive(standard_fleet(capacity=capacity, seed=seed), 80)
    changed = [w for w, (*_, updates) in enumerate(trace) if updates]
    assert changed, "the controller never decided anything"
    # Window 0 runs on the devices' factory tau (0.8), before any decision.
    assert all(r.offered_per_s <= capacity for r, *_ in trace[1:])
    # Settled by window 3. Later, where the budget binds, evidence that accrues may still
    # justify one reallocation (value gain > min_gain); never a move back.
    for name in ("indoor", "outdoor", "night"):
        path = [taus[name] for _, taus, _, _ in trace[3:]]
        moves = [b for a, b in itertools.pairwise(path) if b != a]
        assert len(moves) <= 1, (name, moves)
    if capacity > 20.0:  # slack: the target is set by min_error, not by noise
        assert changed[-1] <= 3, f"tau still moving at windows {changed}"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_drift_in_one_cohort_raises_its_offloads_and_audits_only(seed):
    drift_at = 20

    def night_vision(f):  # the night cohort starts as confident as indoor
        f.cohorts["night"].pmf = f.cohorts["night"].reference = beta_pmf(8, 1.5)

    def drift(f):
        f.cohorts["night"].pmf = beta_pmf(3, 1.5)  # less confident ...
        f.cohorts["night"].err = calibrated_error(1.8)  # ... and more often wrong

    events = {0: night_vision, drift_at: drift}
    trace = drive(standard_fleet(capacity=60.0, seed=seed), 40, events=events)
    # The same fleet without the drift (the other cohorts draw the same random numbers):
    # their tau and audit rate are exactly what they would have been, window by window.
    calm = drive(standard_fleet(capacity=60.0, seed=seed), 40, events={0: night_vision})
    for other in ("indoor", "outdoor"):
        assert [t[1][other] for t in trace] == [t[1][other] for t in calm], other
        assert {t[2][other] for t in trace} == {SETTINGS.audit_floor}
        assert len({t[1][other] for t in trace[drift_at - 5 :]}) == 1
    night_before = np.mean([r.offloads_per_s["night"] for r, *_ in trace[12:drift_at]])
    night_after = np.mean([r.offloads_per_s["night"] for r, *_ in trace[drift_at + 1 :]])
    assert night_after > 1.1 * night_before
    audits_after = {audits["night"] for _, _, audits, _ in trace[drift_at:]}
    assert audits_after == {SETTINGS.audit_drift}
    first = trace[drift_at][3]
    assert [u["scope_id"] for u in first] == ["night"]
    assert "drift: audit rate raised" in first[0]["reason"]
    assert first[0]["signals"]["confidence_psi"] > SETTINGS.psi_drift


def test_a_crash_and_a_replay_change_nothing_and_versions_only_grow():
    straight = drive(standard_fleet(capacity=20.0, seed=9), 30)
    restored = drive(standard_fleet(capacity=20.0, seed=9), 30, restore=True)
    assert [t[3] for t in straight] == [t[3] for t in restored]
    versions: dict[str, int] = {}
    for *_, updates in straight:
        for u in updates:
            assert u["threshold_version"] > versions.get(u["scope_id"], 0)
            versions[u["scope_id"]] = u["threshold_version"]
            fastavro.validation.validate(u, get("ThresholdUpdate").parsed, raise_errors=True)
    # The same window again (a redelivery after the crash) decides nothing.
    state = ControllerState()
    fleet = standard_fleet(capacity=20.0, seed=9)
    first = fleet.run({}, {})
    assert step(first.inputs, state, SETTINGS, B)
    assert step(first.inputs, state, SETTINGS, B) == []


def _cohort_values(rate_per_bucket: float, *, rtt_p99_ms: float | None = None):
    v = {"window_s": W}
    for b in range(B):
        v[bucket_key("conf", b)] = rate_per_bucket * W
    if rtt_p99_ms is not None:
        v["uplink_rtt_p99_ms"] = rtt_p99_ms
    return v


def test_a_device_whose_uplink_cannot_carry_its_cohort_gets_its_own_lower_tau():
    state = ControllerState()
    cohort = _cohort_values(1.0)
    # Both report (statuses) and declare a capacity; pi-1's traffic is small, which is
    # no reason to hold it lower.
    wide = {**_cohort_values(0.5), "statuses": 1.0, "uplink_capacity_bytes_per_s": 1e6,
            "uplink_bytes_per_s": 100.0}  # fmt: skip
    # 2 KiB/s at half share and 4 KiB per offload: 0.25 offloads/s for this device.
    narrow = {**_cohort_values(0.5), "statuses": 1.0, "uplink_capacity_bytes_per_s": 2048.0}
    end = T0 + int(W * US)
    inputs = WindowInputs(end, {"lab": cohort}, {"pi-1": ("lab", wide), "pi-2": ("lab", narrow)})
    updates = step(inputs, state, SETTINGS, B)
    by_scope = {(u["scope"], u["scope_id"]): u for u in updates}
    cohort_tau = by_scope["COHORT", "lab"]["tau"]
    device = by_scope["DEVICE", "pi-2"]
    assert ("DEVICE", "pi-1") not in by_scope
    assert device["tau"] < cohort_tau
    assert device["threshold_version"] > by_scope["COHORT", "lab"]["threshold_version"]
    assert device["reason"].startswith("uplink budget")
    assert device["signals"]["uplink_capacity_bytes_per_s"] == 2048.0
    # A window without pi-2's signals (it was quiet) leaves its override standing.
    quiet = WindowInputs(end + int(W * US), {"lab": cohort}, {"pi-1": ("lab", wide)})
    # (Re-asserted with its version above the cohort's, as the cohort's tau still moves.)
    quiet_updates = step(quiet, state, SETTINGS, B)
    assert [u["tau"] for u in quiet_updates if u["scope_id"] == "pi-2"] in ([], [device["tau"]])
    assert state.overrides["pi-2"].tau == device["tau"]
    # A larger link is declared: the override is cleared by an update back to the cohort's.
    wide2 = {**narrow, "uplink_capacity_bytes_per_s": 1e6}
    inputs2 = WindowInputs(end + 2 * int(W * US), {"lab": cohort}, {"pi-2": ("lab", wide2)})
    cleared = [u for u in step(inputs2, state, SETTINGS, B) if u["scope"] == "DEVICE"]
    assert [(u["scope_id"], u["tau"]) for u in cleared] == [("pi-2", state.cohorts["lab"].tau)]
    assert state.overrides == {}


DEVICE_RATE = 0.5  # events/s per bucket of one device (10/s)


def _uplink_loop(capacity: float | None, windows: int, *, cut_at: int | None = None):
    """A closed loop of one cohort and one device "pi-1" whose uplink traffic is what its
    applied tau makes it send (offloads and audits of `offload_bytes` each), as the
    device reports it in `uplink_bytes_per_s`; it declares `capacity` (or none) in a
    status every other window. `cut_at`: from that window the cloud capacity is 5/s.

    Returns per window (the cohort's tau, the device's applied tau, its offloads/s, the
    window's DEVICE updates).
    """
    state = ControllerState()
    cohort_tau, device_tau = SETTINGS.initial_tau, SETTINGS.initial_tau
    rates = [DEVICE_RATE] * B
    trace = []
    for w in range(windows):
        load = scope_load(rates, round(device_tau * B), SETTINGS.audit_floor)
        device = {**_cohort_values(DEVICE_RATE), "uplink_bytes_per_s": load * 4096.0}
        if w % 2 == 0:
            device["statuses"] = 1.0
            if capacity is not None:
                device["uplink_capacity_bytes_per_s"] = capacity
        fleet = {"teacher_capacity_per_s": 5.0} if cut_at is not None and w >= cut_at else {}
        end = T0 + (w + 1) * int(W * US)
        inputs = WindowInputs(end, {"lab": _cohort_values(1.0)}, {"pi-1": ("lab", device)},
                              fleet)  # fmt: skip
        updates = sorted(step(inputs, state, SETTINGS, B), key=lambda u: u["threshold_version"])
        for u in updates:  # as the device applies them: only a newer version
            if u["scope"] == "COHORT":
                cohort_tau = u["tau"]
            device_tau = u["tau"]
        trace.append((cohort_tau, device_tau, load, [u for u in updates if u["scope"] == "DEVICE"]))
    return trace


def test_a_device_whose_traffic_falls_because_tau_fell_is_not_pushed_lower():
    # The ratchet the old controller had: it read the device's measured traffic as its
    # uplink capacity, so a device sending little (because its tau was lowered) was held
    # lower the next window, until tau = 0. Without a declared capacity there is no
    # per-device uplink limit, whatever the traffic.
    trace = _uplink_loop(None, 8)
    assert all(devices == [] for *_, devices in trace)
    assert all(device == cohort for cohort, device, *_ in trace)
    assert trace[-1][1] >= SETTINGS.initial_tau


def test_a_device_without_a_declared_capacity_follows_its_cohort_down_and_up():
    trace = _uplink_loop(None, 12, cut_at=4)
    assert all(devices == [] for *_, devices in trace)
    assert all(device == cohort for cohort, device, *_ in trace)
    taus = [cohort for cohort, *_ in trace]
    assert min(taus[4:]) < taus[3]  # the cut moved the cohort, and the device with it


def test_a_device_with_a_small_declared_capacity_is_held_within_its_share_of_it():
    capacity = 65_536.0  # B/s: half of it in 4 KiB offloads is 8 offloads/s
    budget = capacity * SETTINGS.uplink_share / SETTINGS.offload_bytes
    trace = _uplink_loop(capacity, 10)
    device_taus = [device for _, device, *_ in trace]
    # Held below its cohort from the first window, within the budget from the next (the
    # first window ran on the factory tau) ...
    assert all(device < cohort for cohort, device, *_ in trace)
    assert max(load for *_, load, _ in trace[1:]) <= budget
    # ... at the largest tau that fits, and not pushed lower as its traffic fell.
    k = round(device_taus[-1] * B)
    assert scope_load([DEVICE_RATE] * B, k + 1, SETTINGS.audit_floor) > budget
    assert len(set(device_taus)) == 1
    # One override, not re-sent every window (its statuses come every other window).
    assert sum(len(devices) for *_, devices in trace) == 1


def test_a_cohort_that_cannot_meet_the_latency_slo_only_audits():
    state = ControllerState()
    end = T0 + int(W * US)
    inputs = WindowInputs(
        end,
        {"fast": _cohort_values(0.1, rtt_p99_ms=80.0), "far": _cohort_values(0.1, rtt_p99_ms=5e3)},
        fleet={"verdict_latency_p99_ms": 100.0},
    )
    taus = {u["scope_id"]: u["tau"] for u in step(inputs, state, SETTINGS, B)}
    assert taus["far"] == 0.0
    assert taus["fast"] > 0.0


@pytest.mark.parametrize(
    ("verdict_p99_ms", "service_p99_ms", "offloads"),
    [
        # Verdicts arrive 30 s after their requests because offloads queue behind a
        # backlog, but the teacher serves a batch within 250 ms: the SLO (2 s) holds and
        # the cohort offloads. Before, the verdicts' own latency was the SLO's input.
        (30_000.0, 250.0, True),
        # A teacher slower than the SLO: audits only, however fast verdicts otherwise come.
        (100.0, 2500.0, False),
    ],
    ids=["backlog_does_not_count", "slow_teacher_only_audits"],
)
def test_the_latency_slo_counts_the_teachers_service_time(
    verdict_p99_ms: float, service_p99_ms: float, offloads: bool
):
    state = ControllerState()
    end = T0 + int(W * US)
    inputs = WindowInputs(
        end,
        {"c": _cohort_values(0.1, rtt_p99_ms=80.0)},
        fleet={"verdict_latency_p99_ms": verdict_p99_ms, "teacher_service_p99_ms": service_p99_ms},
    )
    taus = {u["scope_id"]: u["tau"] for u in step(inputs, state, SETTINGS, B)}
    assert (taus["c"] > 0.0) is offloads


def test_audit_verdicts_are_weighted_by_their_inclusion_probability():
    # One bucket, true error 0.25: the lower half (error 0.4) is offloaded in full, the
    # upper half (error 0.1) audited at 10%. Unweighted, the audit is outnumbered and
    # the estimate is 0.373; weighted by 1/pi it is the bucket's true 0.25.
    n = 100_000
    offloaded, audited = n // 2, n // 2 // 10
    values = {
        bucket_key("vw", 0): offloaded + audited * 10.0,
        bucket_key("vwy", 0): 0.4 * offloaded + 0.1 * audited * 10.0,
        bucket_key("vw2", 0): offloaded + audited * 100.0,
    }
    ev = Evidence()
    ev.update(values, 2, 1.0)
    assert error_estimates(ev, 2, 2.0)[0] == pytest.approx(0.25, abs=0.005)


def test_empty_buckets_take_the_prior_and_estimates_fall_with_confidence():
    ev = Evidence()
    # Bucket 3 saw one wrong answer in one sample: not "always wrong".
    ev.update(
        {bucket_key("vw", 3): 1.0, bucket_key("vwy", 3): 1.0, bucket_key("vw2", 3): 1.0}, B, 1.0
    )
    p = error_estimates(ev, B, 2.0)
    assert all(0.0 < x < 1.0 for x in p)
    assert all(a >= b for a, b in itertools.pairwise(p))
    assert p[-1] == pytest.approx(1 - (B - 0.5) / B)


def test_settings_come_from_the_environment_frozen_and_checked(monkeypatch):
    from pydantic import ValidationError

    from edgeloop.agents.control.settings import ControlSettings, JudgeSettings

    monkeypatch.setenv("EDGELOOP_CONTROL_THRESHOLD__DEADBAND", "0.15")
    monkeypatch.setenv("EDGELOOP_CONTROL_JUDGE__MIN_SAMPLES", "80")
    s = ControlSettings()
    assert (s.threshold.deadband, s.judge.min_samples) == (0.15, 80)
    assert s.signals.window_s == 60.0
    with pytest.raises(ValidationError):
        s.threshold.deadband = 0.3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="must increase"):
        JudgeSettings(canary_share=0.3, wave_shares=(0.25,))
    with pytest.raises(ValidationError, match="audit_drift"):
        ThresholdSettings(audit_floor=0.2, audit_drift=0.1)

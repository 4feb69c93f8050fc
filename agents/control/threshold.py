"""The adaptive offload threshold controller (`control.thresholds.v1`).

Once per window it reads the closed windows' COHORT and DEVICE StreamSignals and the
fleet's capacity and lag, and chooses per cohort the tau (offload when confidence < tau)
that maximises expected accuracy under the cloud budget, then per device a lower tau
where the device's uplink capacity or latency cannot carry its cohort's. The uplink limit
is `uplink_share` of the capacity the device declares (DeviceStatus
`uplink_capacity_bytes_per_s`), never its measured traffic (`uplink_bytes_per_s`): that
falls with tau, so a limit read from it would hold a device lower each window (to 0).
docs/architecture.md ("Control plane") has the equations; in short:

    C_eff = C * max(min_share, 1 - lag_s / drain_horizon_s)       cloud budget, offloads/s
    load(tau) = sum_c [ sum_{b < k_c} r_cb + a_c sum_{b >= k_c} r_cb ],   k_c = tau_c * B

and, with the monotone error estimates p_cb (estimate.py), a greedy water-filling over
all (cohort, bucket) pairs in order of decreasing p_cb, each costing r_cb (1 - a_c) and
taken while load <= (1 - headroom) C_eff and p_cb >= min_error, gives every cohort its
target tau*_c. Stability: a decrease the budget forces (load(tau) > C_eff) is applied in
full at once; any other change must exceed the deadband, moves at most max_step per
window, an increase is taken only if the fleet load with it stays within
(1 - headroom) C_eff, and the voluntary moves of a window are taken together only if
they raise V = sum of r_cb (p_cb - min_error) over offloaded buckets by min_gain.
Each cohort's error prior is the fleet's pooled curve (empirical Bayes, estimate.py).

Versions: threshold_version = 4 * window_end_ms + rank (COHORT 1, DEVICE 2), from the
window alone, so a replay after a crash yields the same version and never a lower one; a
window at or before the last one decided is ignored (idempotent replay). In the same
window a device override outranks its cohort's update, which a device applies only when
its version is newer (edge/control.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeloop.agents.control.estimate import Evidence, error_estimates, pooled
from edgeloop.agents.control.settings import ThresholdSettings
from edgeloop.agents.control.signals import bucket_key
from edgeloop.agents.ids import derived_id

RANK = {"COHORT": 1, "DEVICE": 2}
_EPS = 1e-9


def threshold_version(window_end_us: int, scope: str) -> int:
    """The version of an update decided at `window_end_us` for `scope` (module docstring)."""
    return 4 * (window_end_us // 1000) + RANK[scope]


@dataclass(slots=True)
class CohortState:
    """What the controller remembers of one cohort between windows."""

    tau: float
    audit_rate: float
    version: int = 0
    rates: list[float] = field(default_factory=list)  # events/s per bucket (EWMA)
    evidence: Evidence = field(default_factory=Evidence)
    drifting: bool = False


@dataclass(slots=True)
class DeviceOverride:
    """A device held below its cohort's tau (uplink or latency)."""

    cohort: str
    tau: float
    version: int


@dataclass(slots=True)
class ControllerState:
    """The controller's state (one Faust table key): cohorts, overrides, last window."""

    last_window_end_us: int = 0
    cohorts: dict[str, CohortState] = field(default_factory=dict)
    overrides: dict[str, DeviceOverride] = field(default_factory=dict)
    # device -> the uplink capacity (bytes/s) its newest status declared; kept across
    # windows with no status (the status interval may exceed the window), dropped when a
    # status declares none. One entry per declaring device of the fleet.
    capacities: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (the changelog value)."""
        return {
            "last_window_end_us": self.last_window_end_us,
            "cohorts": {
                k: {
                    "tau": c.tau,
                    "audit_rate": c.audit_rate,
                    "version": c.version,
                    "rates": list(c.rates),
                    "evidence": c.evidence.to_json(),
                    "drifting": c.drifting,
                }
                for k, c in self.cohorts.items()
            },
            "overrides": {
                k: {"cohort": o.cohort, "tau": o.tau, "version": o.version}
                for k, o in self.overrides.items()
            },
            "capacities": dict(self.capacities),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ControllerState:
        """Inverse of `to_json`."""
        cohorts = {
            k: CohortState(
                tau=float(c["tau"]),
                audit_rate=float(c["audit_rate"]),
                version=int(c["version"]),
                rates=[float(x) for x in c["rates"]],
                evidence=Evidence.from_json(c["evidence"]),
                drifting=bool(c["drifting"]),
            )
            for k, c in data["cohorts"].items()
        }
        overrides = {k: DeviceOverride(**o) for k, o in data["overrides"].items()}
        # A changelog written before capacities were kept has none: no limit until the
        # devices' next statuses.
        capacities = {k: float(v) for k, v in data.get("capacities", {}).items()}
        return cls(int(data["last_window_end_us"]), cohorts, overrides, capacities)


@dataclass(frozen=True, slots=True)
class WindowInputs:
    """One window's closed signals, as the controller reads them.

    Args:
        window_end_us: the windows' common end.
        cohorts: cohort -> its COHORT StreamSignal `values`.
        devices: device id -> (its cohort, its DEVICE StreamSignal `values`).
        fleet: FLEET values: `offload_lag_s`, `verdict_latency_p99_ms` and, when the
            teacher's sustained rate is measured, `teacher_capacity_per_s`.
        capacity_override: the cloud capacity (offloads/s) an operator set at runtime
            (`edgeloop control capacity`); it wins over the measured rate and the setting.
    """

    window_end_us: int
    cohorts: Mapping[str, Mapping[str, float]]
    devices: Mapping[str, tuple[str, Mapping[str, float]]] = field(default_factory=dict)
    fleet: Mapping[str, float] = field(default_factory=dict)
    capacity_override: float | None = None


def _k(tau: float, buckets: int) -> int:
    """Buckets offloaded at `tau` (tau sits on a bucket edge)."""
    return max(0, min(buckets, round(tau * buckets)))


def scope_load(rates: list[float], k: int, audit_rate: float) -> float:
    """Offloads plus audits per second when buckets < k are offloaded."""
    return sum(rates[:k]) + audit_rate * sum(rates[k:])


def _latency_ms(values: Mapping[str, float], fleet: Mapping[str, float]) -> float:
    """An offloaded decision's latency for the SLO: uplink RTT p99 + the teacher's service
    time p99 (measured by the workers: batch handed to its verdicts acknowledged).

    The wait behind a backlog is not added: the budget drains it (C_eff), and counting it
    would switch offloading off after every transient overload of our own making. That is
    why the verdicts' own latency (from the request's ts, so with the backlog in it) is
    only the fallback, for workers that report no service time.
    """
    rtt = values.get("uplink_rtt_p99_ms", 0.0)
    teacher = fleet.get("teacher_service_p99_ms")
    if teacher is None:
        teacher = fleet.get("verdict_latency_p99_ms", values.get("verdict_latency_p99_ms", 0.0))
    return rtt + teacher


@dataclass(slots=True)
class _Window:
    """What one window's decision works from (internal)."""

    capacity: float
    lag_s: float
    c_eff: float
    source: str  # where the capacity came from: override, measured or settings
    new: set[str] = field(default_factory=set)
    errors: dict[str, list[float]] = field(default_factory=dict)
    caps: dict[str, int] = field(default_factory=dict)
    psis: dict[str, float] = field(default_factory=dict)
    old: dict[str, tuple[float, float]] = field(default_factory=dict)


def _water_fill(
    state: ControllerState, w: _Window, *, budget: float, settings: ThresholdSettings
) -> dict[str, int]:
    """Buckets to offload per cohort: highest expected error first, within `budget`."""
    cohorts = state.cohorts
    load = sum(c.audit_rate * sum(c.rates) for c in cohorts.values())
    take = dict.fromkeys(cohorts, 0)
    closed: set[str] = set()
    order = sorted((-w.errors[n][b], b, n) for n in cohorts for b in range(w.caps[n]))
    for neg_p, b, name in order:
        if name in closed or b != take[name] or -neg_p < settings.min_error:
            closed.add(name)
            continue
        c = cohorts[name]
        cost = c.rates[b] * (1.0 - c.audit_rate)
        if load + cost > budget + _EPS:
            closed.add(name)
            continue
        load += cost
        take[name] += 1
    return take


def _observe(
    inputs: WindowInputs, state: ControllerState, settings: ThresholdSettings, buckets: int
) -> _Window:
    """Fold the window's signals into every cohort's rates, evidence and audit rate."""
    fleet = inputs.fleet
    capacity, source = capacity_in_force(inputs.capacity_override, fleet, settings)
    lag_s = fleet.get("offload_lag_s", 0.0)
    share = max(settings.min_capacity_share, 1.0 - lag_s / settings.drain_horizon_s)
    w = _Window(capacity, lag_s, capacity * share, source)
    for name in sorted(set(state.cohorts) | set(inputs.cohorts)):
        if name not in state.cohorts:
            state.cohorts[name] = CohortState(settings.initial_tau, settings.audit_floor)
            w.new.add(name)
        c = state.cohorts[name]
        w.old[name] = (c.tau, c.audit_rate)
        values = inputs.cohorts.get(name, {})
        window_s = values.get("window_s", 1.0)
        w.psis[name] = values.get("confidence_psi", 0.0)
        c.drifting = w.psis[name] > settings.psi_drift
        c.evidence.update(values, buckets, settings.decay_drift if c.drifting else settings.decay)
        observed = [values.get(bucket_key("conf", b), 0.0) / window_s for b in range(buckets)]
        if not c.rates:
            c.rates = observed
        else:  # an absent cohort observes zero traffic
            a = settings.rate_alpha
            c.rates = [a * o + (1 - a) * r for o, r in zip(observed, c.rates, strict=True)]
        c.audit_rate = settings.audit_drift if c.drifting else settings.audit_floor
        slow = _latency_ms(values, fleet) > settings.latency_slo_ms
        w.caps[name] = 0 if slow else buckets
    # Empirical Bayes: the fleet's pooled curve (calibration prior, strength s) is each
    # cohort's prior (strength s_pool); a drifting cohort's own evidence soon outweighs it.
    fleet_ev = pooled([c.evidence for c in state.cohorts.values()], buckets)
    fleet_p = error_estimates(fleet_ev, buckets, settings.prior_strength)
    for name, c in state.cohorts.items():
        w.errors[name] = error_estimates(c.evidence, buckets, settings.pool_strength, fleet_p)
    return w


def capacity_in_force(
    override: float | None, fleet: Mapping[str, float], settings: ThresholdSettings
) -> tuple[float, str]:
    """The cloud capacity C (offloads/s) a decision uses and where it came from.

    Args:
        override: an operator's runtime value (`edgeloop control capacity`), or None.
        fleet: the FLEET window's values (`teacher_capacity_per_s` when measured).
        settings: `cloud_capacity_per_s`, the worker's setting.

    Returns:
        (C, "override" | "measured" | "settings"), in that order of precedence: the
        operator knows of a change (a teacher node taken out) before any measurement.
    """
    if override is not None:
        return override, "override"
    if "teacher_capacity_per_s" in fleet:
        return fleet["teacher_capacity_per_s"], "measured"
    return settings.cloud_capacity_per_s, "settings"


def _fleet_load(state: ControllerState, ks: Mapping[str, int]) -> float:
    return sum(scope_load(c.rates, ks[n], c.audit_rate) for n, c in state.cohorts.items())


def _decide(
    state: ControllerState, w: _Window, settings: ThresholdSettings, buckets: int
) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
    """Target and applied buckets per cohort, and why each changed (module docstring)."""
    target_budget = (1.0 - settings.headroom) * w.c_eff
    take = _water_fill(state, w, budget=target_budget, settings=settings)
    ks = {n: _k(c.tau, buckets) for n, c in state.cohorts.items()}
    overloaded = _fleet_load(state, ks) > w.c_eff + _EPS
    max_k = max(1, math.floor(settings.max_step * buckets + _EPS))
    dead_k = math.floor(settings.deadband * buckets + _EPS)
    forced_from = dict(ks)
    why: dict[str, str] = {}
    raises = []
    for n in sorted(state.cohorts):
        gap = take[n] - ks[n]
        if gap < 0 and (overloaded or w.caps[n] == 0):
            ks[n] = take[n]  # forced: in full, at once
            why[n] = "over budget" if overloaded else "latency SLO"
        elif gap < -dead_k and not overloaded:
            ks[n] += max(gap, -max_k)
            why[n] = "lower expected error"
        elif gap > dead_k and not overloaded:
            raises.append((-w.errors[n][ks[n]] if ks[n] < buckets else 0.0, n))
    for _, n in sorted(raises):  # highest expected error gained first
        trial = dict(ks)
        for k in range(ks[n] + min(take[n] - ks[n], max_k), ks[n] + dead_k, -1):
            trial[n] = k  # as far towards the target as fits, beyond the deadband
            if _fleet_load(state, trial) <= target_budget + _EPS:
                ks[n] = k
                why[n] = "capacity to spare"
                break
    voluntary = [n for n in why if why[n] in ("lower expected error", "capacity to spare")]
    if voluntary:
        # Hysteresis on value: voluntary moves are taken together, and only when they
        # gain more than `min_gain` of the current value; a swap of capacity between
        # cohorts whose errors only differ by noise is not worth a new version.
        base = dict(ks)
        for n in voluntary:
            base[n] = forced_from[n]
        now, then = _value(state, w, base, settings), _value(state, w, ks, settings)
        if then - now <= settings.min_gain * max(now, _EPS):
            for n in voluntary:
                ks[n] = base[n]
                del why[n]
    return take, ks, why


def _value(
    state: ControllerState, w: _Window, ks: Mapping[str, int], settings: ThresholdSettings
) -> float:
    """V = sum over offloaded buckets of r_cb (p_cb - min_error): edge errors the teacher
    fixes per second, net of a teacher call's price (min_error)."""
    return sum(
        c.rates[b] * (w.errors[n][b] - settings.min_error)
        for n, c in state.cohorts.items()
        for b in range(ks[n])
    )


def step(
    inputs: WindowInputs, state: ControllerState, settings: ThresholdSettings, buckets: int
) -> list[dict[str, Any]]:
    """Decide one window: the ThresholdUpdates (Avro-shaped dicts) it changes.

    Args:
        inputs: the window's closed signals.
        state: the controller's state, updated in place.
        settings: the controller's parameters.
        buckets: B, the signals' confidence buckets.

    Returns:
        COHORT updates, then DEVICE updates, each sorted by scope id; none for a window at
        or before the last one decided (a replay).
    """
    if inputs.window_end_us <= state.last_window_end_us:
        return []
    state.last_window_end_us = inputs.window_end_us
    w = _observe(inputs, state, settings, buckets)
    load_before = _fleet_load(state, {n: _k(c.tau, buckets) for n, c in state.cohorts.items()})
    take, ks, why = _decide(state, w, settings, buckets)
    load_after = _fleet_load(state, ks)
    out: list[dict[str, Any]] = []
    emitted: set[str] = set()
    version = threshold_version(inputs.window_end_us, "COHORT")
    for n in sorted(state.cohorts):
        c = state.cohorts[n]
        c.tau = ks[n] / buckets
        old_tau, old_audit = w.old[n]
        if n not in w.new and (c.tau, c.audit_rate) == w.old[n]:
            continue
        reason = why.get(n, "first decision" if n in w.new else "audit rate")
        if c.audit_rate != old_audit:
            reason += "; drift: audit rate raised" if c.drifting else "; audit rate to floor"
        c.version = version
        signals = {
            "capacity_per_s": w.capacity,
            "capacity_override": 1.0 if w.source == "override" else 0.0,
            "effective_capacity_per_s": w.c_eff,
            "offload_lag_s": w.lag_s,
            "fleet_load_before_per_s": load_before,
            "fleet_load_after_per_s": load_after,
            "cohort_load_per_s": scope_load(c.rates, ks[n], c.audit_rate),
            "confidence_psi": w.psis.get(n, 0.0),
            "previous_tau": old_tau,
            "target_tau": take[n] / buckets,
            "expected_error_at_tau": w.errors[n][min(ks[n], buckets - 1)],
        }
        text = (
            f"{reason}: tau {old_tau:.2f} -> {c.tau:.2f} (target {take[n] / buckets:.2f}), "
            f"audit {old_audit:.3f} -> {c.audit_rate:.3f}; fleet load {load_before:.1f} -> "
            f"{load_after:.1f}/s of {w.c_eff:.1f}/s (capacity {w.capacity:.1f} {w.source}, "
            f"lag {w.lag_s:.1f} s)"
        )
        out.append(
            _update(("COHORT", n, version), c.tau, c.audit_rate, text, signals, settings=settings)
        )
        emitted.add(n)
    out.extend(_devices(inputs, state, settings, buckets, emitted))
    return out


def _devices(
    inputs: WindowInputs,
    state: ControllerState,
    settings: ThresholdSettings,
    buckets: int,
    emitted: set[str],
) -> list[dict[str, Any]]:
    """Per-device overrides: a device whose uplink or latency cannot carry its cohort's tau
    gets the largest tau that fits; an override no longer needed is cleared by an update
    back to the cohort's tau; one whose cohort changed tau this window is re-asserted."""
    out = []
    version = threshold_version(inputs.window_end_us, "DEVICE")
    for dev in sorted(set(inputs.devices) | set(state.overrides)):
        cohort, values = inputs.devices.get(dev, (None, {}))
        held = state.overrides.get(dev)
        cohort = cohort or (held.cohort if held else None)
        if cohort is None or cohort not in state.cohorts:
            continue
        c = state.cohorts[cohort]
        capacity = _declared_capacity(dev, values, state)
        if values:
            tau, limit = _device_tau(values, c, inputs.fleet, settings, buckets,
                                     capacity=capacity)  # fmt: skip
        elif held is not None and cohort in emitted:
            # No signals from it this window, but its cohort moved: re-assert the override.
            tau, limit = min(held.tau, c.tau), "override kept"
        else:
            continue
        if tau < c.tau - _EPS:
            if held and held.tau == tau and cohort not in emitted:
                continue
            state.overrides[dev] = DeviceOverride(cohort, tau, version)
            text = f"{limit}: tau {tau:.2f} below cohort {cohort}'s {c.tau:.2f}"
        elif held is not None:
            del state.overrides[dev]
            text = f"override cleared: back to cohort {cohort}'s tau {c.tau:.2f}"
        else:
            continue
        signals = {
            "cohort_tau": c.tau,
            **{
                k2: values[k2]
                for k2 in ("uplink_bytes_per_s", "uplink_rtt_p99_ms", "offload_rate")
                if k2 in values
            },
        }
        if capacity is not None:
            signals["uplink_capacity_bytes_per_s"] = capacity
        out.append(
            _update(("DEVICE", dev, version), tau, c.audit_rate, text, signals, settings=settings)
        )
    return out


def _declared_capacity(
    dev: str, values: Mapping[str, float], state: ControllerState
) -> float | None:
    """The uplink capacity `dev` declared in its newest status: this window's when it
    reported (a report without one clears it), else the one remembered."""
    if values.get("statuses", 0.0) > 0:
        declared = values.get("uplink_capacity_bytes_per_s")
        if declared is None:
            state.capacities.pop(dev, None)
        else:
            state.capacities[dev] = declared
    return state.capacities.get(dev)


def _device_tau(
    values: Mapping[str, float],
    c: CohortState,
    fleet: Mapping[str, float],
    settings: ThresholdSettings,
    buckets: int,
    *,
    capacity: float | None,
) -> tuple[float, str]:
    """The largest tau up to the cohort's that the device's uplink and latency allow.

    The uplink budget is `uplink_share * capacity / offload_bytes` offloads/s, from the
    capacity the device declared (None: no uplink limit). Its load at k offloaded
    buckets comes from its own event rates per bucket, which do not depend on tau.
    """
    if _latency_ms(values, fleet) > settings.latency_slo_ms:
        return 0.0, "latency SLO"
    k, limit = _k(c.tau, buckets), "none"
    if capacity is not None:
        budget = capacity * settings.uplink_share / settings.offload_bytes
        window_s = values.get("window_s", 1.0)
        rates = [values.get(bucket_key("conf", b), 0.0) / window_s for b in range(buckets)]
        while k > 0 and scope_load(rates, k, c.audit_rate) > budget + _EPS:
            k, limit = k - 1, "uplink budget"
    return k / buckets, limit


def _update(
    key: tuple[str, str, int],
    tau: float,
    audit_rate: float,
    reason: str,
    signals: dict[str, float],
    *,
    settings: ThresholdSettings,
) -> dict[str, Any]:
    scope, scope_id, version = key
    return {
        "event_id": derived_id("threshold", f"{scope}:{scope_id}:{version}"),
        "ts": (version // 4) * 1000,
        "scope": scope,
        "scope_id": scope_id,
        "threshold_version": version,
        "tau": tau,
        "confidence_kind": settings.confidence_kind,
        "audit_rate": audit_rate,
        "reason": reason,
        "signals": signals,
    }

"""Stream signals: per device, cohort and fleet tumbling windows (`ml.signals.v1`).

Inputs are InferenceEvents, (OffloadRequest, CloudVerdict) pairs, DeviceStatus reports and
samples of the offload consumer's lag, each reduced to a small observation below. Each
observation adds to the window of its event time, for every scope the aggregator keeps
(DEVICE: its device, COHORT: its cohort, FLEET: "fleet"). In Faust one aggregator runs
per stream keyed by the scope (the device-keyed source for DEVICE, `group_by(cohort)` for
COHORT, a constant key for FLEET), so a window holds everything of its scope.

Windows and lateness (event time, as Faust's windowed tables with `expires`): a window
[s, s + W) closes once the watermark (the newest event time seen, or the clock passed to
`tick` when the stream is idle) reaches s + W + L, L = `allowed_lateness_s`. An
observation whose window has closed is late: it is counted in `late_dropped` of its
scope's next window and dropped, never added to a closed window. Closing emits one
StreamSignal record per window, with `event_id` and `ts` derived from the scope and the
window only, so replaying the same input after a crash yields the same records.

PSI reference: the confidence histogram the serving model version showed when it was
released, keyed by model version in `SignalState.references`. It is kept in the table's
changelog and is meant to be published with the release on a compacted topic keyed by
`<model>:<version>` (so a restart or a new worker keeps it); when none was recorded, the
version's first `reference_min_events` events become it: the confidence histograms of the
closed windows of the aggregator's widest scope (FLEET, else COHORT, else DEVICE) whose
majority version it is are summed until they hold that many events (the window that
completes it carries `psi_reference_bootstrapped = 1`). Summing over windows, not waiting
for one window with that many events, is what lets a small or slow fleet get a reference
at all: 12 devices at 5 Hz make 240 events per 4 s window, and a fleet that is still
loading its models makes fewer, so a one-window rule could wait past the drift it is meant
to detect and take a drifted reference. A window is compared with the reference of the
model version that produced most of its events (`psi_model_version`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from edgeloop.agents.control.histograms import (
    LATENCY_BUCKETS,
    confidence_bucket,
    latency_bucket,
    latency_quantile,
    psi,
)
from edgeloop.agents.control.settings import SignalSettings
from edgeloop.agents.ids import derived_id

Scope = Literal["DEVICE", "COHORT", "FLEET"]
SCOPES: tuple[Scope, ...] = ("DEVICE", "COHORT", "FLEET")
FLEET_ID = "fleet"
US = 1_000_000


def bucket_key(name: str, index: int) -> str:
    """Name of a per-bucket value, e.g. `conf_07` (two digits keep them sorted)."""
    return f"{name}_{index:02d}"


@dataclass(frozen=True, slots=True)
class InferenceObs:
    """What a window needs of one InferenceEvent."""

    device_id: str
    cohort: str
    ts_us: int
    model_version: int
    confidence: float
    decision: str  # LOCAL | OFFLOAD | AUDIT
    latency_ms: float

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> InferenceObs:
        """From a decoded InferenceEvent (or EnrichedInferenceEvent) dict."""
        return cls(**inference_fields(rec))


def inference_fields(rec: Mapping[str, Any]) -> dict[str, Any]:
    """`InferenceObs`'s fields (by name, in its order) of a decoded InferenceEvent (or
    EnrichedInferenceEvent) dict, without building the object: the worker observes
    every event it enriches for the control log, which carries these fields as JSON.

    Raises:
        KeyError, TypeError, ValueError: a field missing or of the wrong type.
    """
    lat = rec["latency"]
    total_us = lat["preprocess_us"] + lat["inference_us"] + lat["decision_us"]
    return {
        "device_id": str(rec["device_id"]),
        "cohort": str(rec["cohort"]),
        "ts_us": int(rec["ts"]),
        "model_version": int(rec["model_version"]),
        "confidence": float(rec["confidence"]),
        "decision": str(rec["decision"]),
        "latency_ms": total_us / 1000.0,
    }


@dataclass(frozen=True, slots=True)
class VerdictObs:
    """One teacher verdict with what the device knew when it sent the sample.

    `inclusion_prob` is the probability that this sample reached the teacher: 1 for an
    OFFLOAD (every sample below tau is sent), the audit rate in force for an AUDIT. The
    controller weights each verdict by its inverse (Horvitz-Thompson), so the audited
    region above tau counts for the traffic it stands for.
    """

    device_id: str
    cohort: str
    ts_us: int
    edge_confidence: float
    decision: str  # OFFLOAD | AUDIT
    agree: bool
    latency_ms: float
    inclusion_prob: float

    @classmethod
    def from_records(
        cls, request: Mapping[str, Any], verdict: Mapping[str, Any], audit_rate: float
    ) -> VerdictObs:
        """From a decoded OffloadRequest and the CloudVerdict answering it.

        Windowed by the verdict's own time, so a lagging teacher does not make its
        verdicts late. `audit_rate`: the rate of the threshold version the request names.
        """
        decision = str(request["reason"])
        prob = 1.0 if decision != "AUDIT" else min(1.0, max(audit_rate, 1e-6))
        return cls(
            device_id=str(verdict["device_id"]),
            cohort=str(request["cohort"]),
            ts_us=int(verdict["ts"]),
            edge_confidence=float(request["confidence"]),
            decision=decision,
            agree=bool(verdict["agree"]),
            latency_ms=float(verdict["latency_ms"]),
            inclusion_prob=prob,
        )


@dataclass(frozen=True, slots=True)
class StatusObs:
    """What a window needs of one DeviceStatus.

    `uplink_bytes_per_s` is the traffic the device sent (it depends on tau);
    `uplink_capacity_bytes_per_s` is what its link can carry, as declared on the device
    (None: undeclared; also for control-log records written before the field existed).
    """

    device_id: str
    cohort: str
    ts_us: int
    rtt_ms: float | None
    uplink_bytes_per_s: float | None
    outbox_depth: int
    uplink_capacity_bytes_per_s: float | None = None

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> StatusObs:
        """From a decoded DeviceStatus dict (a writer without the capacity field: None)."""
        rtt, up = rec.get("rtt_ms"), rec.get("uplink_bytes_per_s")
        cap = rec.get("uplink_capacity_bytes_per_s")
        return cls(
            device_id=str(rec["device_id"]),
            cohort=str(rec["cohort"]),
            ts_us=int(rec["ts"]),
            rtt_ms=None if rtt is None else float(rtt),
            uplink_bytes_per_s=None if up is None else float(up),
            outbox_depth=int(rec["outbox_depth"]),
            uplink_capacity_bytes_per_s=None if cap is None else float(cap),
        )


@dataclass(frozen=True, slots=True)
class LagObs:
    """A sample of the offload consumer's lag (seconds behind), fleet scope only."""

    ts_us: int
    lag_s: float


Obs = InferenceObs | VerdictObs | StatusObs | LagObs


@dataclass(slots=True)
class WindowAcc:
    """Running sums of one scope's window; every field adds up across partial windows."""

    buckets: int
    events: int = 0
    offloads: int = 0
    audits: int = 0
    conf: list[int] = field(default_factory=list)
    latency: list[int] = field(default_factory=list)
    by_version: dict[str, int] = field(default_factory=dict)
    verdicts: int = 0
    v_n: list[int] = field(default_factory=list)
    v_disagree: list[int] = field(default_factory=list)
    v_w: list[float] = field(default_factory=list)  # sum of 1/pi
    v_wy: list[float] = field(default_factory=list)  # sum of wrong/pi
    v_w2: list[float] = field(default_factory=list)  # sum of 1/pi^2
    v_latency: list[int] = field(default_factory=list)
    statuses: int = 0
    rtt: list[int] = field(default_factory=list)
    uplink_sum: float = 0.0
    uplink_n: int = 0
    outbox_max: int = 0
    # The newest status's declared uplink capacity (None: it declared none) and its time;
    # a capacity is a setting, not a sum: the newest report is the one in force.
    capacity: float | None = None
    capacity_ts_us: int = -1
    lag_max_s: float = 0.0
    lag_n: int = 0

    def __post_init__(self) -> None:
        b = self.buckets
        for name in ("conf", "v_n", "v_disagree"):
            if not getattr(self, name):
                setattr(self, name, [0] * b)
        for name in ("v_w", "v_wy", "v_w2"):
            if not getattr(self, name):
                setattr(self, name, [0.0] * b)
        for name in ("latency", "v_latency", "rtt"):
            if not getattr(self, name):
                setattr(self, name, [0] * LATENCY_BUCKETS)

    def add(self, obs: Obs) -> None:
        """Add one observation to the sums."""
        if isinstance(obs, InferenceObs):
            self.events += 1
            self.offloads += obs.decision == "OFFLOAD"
            self.audits += obs.decision == "AUDIT"
            self.conf[confidence_bucket(obs.confidence, self.buckets)] += 1
            self.latency[latency_bucket(obs.latency_ms)] += 1
            key = str(obs.model_version)
            self.by_version[key] = self.by_version.get(key, 0) + 1
        elif isinstance(obs, VerdictObs):
            b = confidence_bucket(obs.edge_confidence, self.buckets)
            w = 1.0 / obs.inclusion_prob
            self.verdicts += 1
            self.v_n[b] += 1
            self.v_disagree[b] += not obs.agree
            self.v_w[b] += w
            self.v_wy[b] += w * (not obs.agree)
            self.v_w2[b] += w * w
            self.v_latency[latency_bucket(obs.latency_ms)] += 1
        elif isinstance(obs, StatusObs):
            self.statuses += 1
            if obs.rtt_ms is not None:
                self.rtt[latency_bucket(obs.rtt_ms)] += 1
            if obs.uplink_bytes_per_s is not None:
                self.uplink_sum += obs.uplink_bytes_per_s
                self.uplink_n += 1
            self.outbox_max = max(self.outbox_max, obs.outbox_depth)
            if obs.ts_us >= self.capacity_ts_us:  # ties: the later in log order
                self.capacity_ts_us = obs.ts_us
                self.capacity = obs.uplink_capacity_bytes_per_s
        else:
            self.lag_max_s = max(self.lag_max_s, obs.lag_s)
            self.lag_n += 1

    @property
    def sample_count(self) -> int:
        return self.events + self.verdicts + self.statuses + self.lag_n


_WINDOW_FIELDS = tuple(f.name for f in fields(WindowAcc))


@dataclass(slots=True)
class SignalState:
    """One aggregator's state (a Faust table value): open windows, watermark, references."""

    scopes: list[str]
    watermark_us: int = 0
    # When the earliest open window closes: `tick` scans the windows only from then on,
    # so an event costs O(1) and not O(open windows).
    next_close_us: int = 2**63 - 1
    windows: dict[str, WindowAcc] = field(default_factory=dict)
    late: dict[str, int] = field(default_factory=dict)  # scope key -> late, not yet reported
    late_total: int = 0
    references: dict[str, list[float]] = field(default_factory=dict)  # version -> histogram
    # version -> the histogram summed so far, for a version without a reference yet
    pending_references: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (the changelog value).

        It shares this state's lists and dicts (serialize it before the state changes):
        `dataclasses.asdict` deep-copied every window's histograms, 15 ms per control
        batch with a few dozen open windows, about 9% of a worker's CPU at 1k events/s
        (py-spy), where this takes well under a millisecond.
        """
        return {
            "scopes": self.scopes,
            "watermark_us": self.watermark_us,
            "next_close_us": self.next_close_us,
            "windows": {
                key: {name: getattr(acc, name) for name in _WINDOW_FIELDS}
                for key, acc in self.windows.items()
            },
            "late": self.late,
            "late_total": self.late_total,
            "references": self.references,
            "pending_references": self.pending_references,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SignalState:
        """Inverse of `to_json`."""
        windows = {k: WindowAcc(**v) for k, v in data["windows"].items()}
        return cls(
            scopes=list(data["scopes"]),
            watermark_us=int(data["watermark_us"]),
            next_close_us=int(data["next_close_us"]),
            windows=windows,
            late=dict(data["late"]),
            late_total=int(data["late_total"]),
            references={k: list(v) for k, v in data["references"].items()},
            # Absent from changelogs written before references were summed over windows.
            pending_references={k: list(v) for k, v in data.get("pending_references", {}).items()},
        )


def _scope_ids(obs: Obs, scopes: Iterable[str]) -> list[tuple[str, str]]:
    if isinstance(obs, LagObs):
        return [("FLEET", FLEET_ID)] if "FLEET" in scopes else []
    ids = {"DEVICE": obs.device_id, "COHORT": obs.cohort, "FLEET": FLEET_ID}
    return [(s, ids[s]) for s in SCOPES if s in scopes]


def _window_start(ts_us: int, window_us: int) -> int:
    return ts_us - ts_us % window_us


def observe(obs: Obs, state: SignalState, settings: SignalSettings) -> list[dict[str, Any]]:
    """Add one observation and close the windows its time makes complete.

    Args:
        obs: the observation.
        state: the aggregator's state, updated in place.
        settings: window length, lateness, buckets.

    Returns:
        StreamSignal records (Avro-shaped dicts) of the windows that closed, in
        (window_end, scope, scope_id) order.
    """
    window_us = round(settings.window_s * US)
    start = _window_start(obs.ts_us, window_us)
    lateness_us = round(settings.allowed_lateness_s * US)
    for scope, scope_id in _scope_ids(obs, state.scopes):
        key = f"{scope}|{scope_id}"
        if start + window_us + lateness_us <= state.watermark_us:
            state.late[key] = state.late.get(key, 0) + 1
            state.late_total += 1
            continue
        wkey = f"{key}|{start}"
        acc = state.windows.get(wkey)
        if acc is None:
            acc = state.windows[wkey] = WindowAcc(settings.buckets)
            state.next_close_us = min(state.next_close_us, start + window_us + lateness_us)
        acc.add(obs)
    return tick(obs.ts_us, state, settings)


def tick(now_us: int, state: SignalState, settings: SignalSettings) -> list[dict[str, Any]]:
    """Advance the watermark to `now_us` (if later) and emit the windows it closes.

    Called by `observe` with each event's time, and by a timer with the clock so an idle
    stream still closes its windows.
    """
    state.watermark_us = max(state.watermark_us, now_us)
    if state.watermark_us < state.next_close_us:
        return []
    window_us = round(settings.window_s * US)
    lateness_us = round(settings.allowed_lateness_s * US)
    closing = []
    state.next_close_us = 2**63 - 1
    for wkey in state.windows:
        scope, scope_id, start_s = wkey.split("|")
        start = int(start_s)
        close = start + window_us + lateness_us
        if close <= state.watermark_us:
            closing.append((start + window_us, scope, scope_id, start, wkey))
        else:
            state.next_close_us = min(state.next_close_us, close)
    out = []
    widest = _widest(state.scopes)
    # The widest scope's windows are evaluated first within one window end, so that the
    # window completing a bootstrapped reference gives the narrower scopes of the same end
    # their PSI too; the records still come out in (window_end, scope, scope_id) order.
    for end, _, scope, scope_id, start, wkey in sorted(
        (end, scope != widest, scope, scope_id, start, wkey)
        for end, scope, scope_id, start, wkey in closing
    ):
        acc = state.windows.pop(wkey)
        late = state.late.pop(f"{scope}|{scope_id}", 0)
        bootstrapped = scope == widest and _feed_reference(acc, state, settings)
        values = window_values(
            acc, settings, state.references, window_us / US, per_device=scope == "DEVICE"
        )
        if bootstrapped:
            values["psi_reference_bootstrapped"] = 1.0
        values["late_dropped"] = float(late)
        out.append(
            {
                "event_id": derived_id("signal", f"{scope}:{scope_id}:{start}:{end}"),
                "ts": end,
                "scope": scope,
                "scope_id": scope_id,
                "window_start": start,
                "window_end": end,
                "values": values,
                "sample_count": acc.sample_count,
            }
        )
    out.sort(key=lambda r: (r["window_end"], r["scope"], r["scope_id"]))
    return out


def _widest(scopes: Iterable[str]) -> str | None:
    present = [s for s in SCOPES if s in scopes]
    return present[-1] if present else None


def _majority_version(acc: WindowAcc) -> str | None:
    # The most frequent version; ties go to the newer one (deterministic).
    if not acc.by_version:
        return None
    return max(acc.by_version, key=lambda k: (acc.by_version[k], int(k)))


def _feed_reference(acc: WindowAcc, state: SignalState, settings: SignalSettings) -> bool:
    """Add a closed window's confidences to its version's pending reference; True when
    that completes the reference (it then moves to `state.references`)."""
    version = _majority_version(acc)
    if version is None or version in state.references or not acc.events:
        return False
    pending = state.pending_references.setdefault(version, [0.0] * len(acc.conf))
    for b, c in enumerate(acc.conf):
        pending[b] += c
    if sum(pending) < settings.reference_min_events:
        return False
    state.references[version] = state.pending_references.pop(version)
    return True


def _rate(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def window_values(
    acc: WindowAcc,
    settings: SignalSettings,
    references: dict[str, list[float]],
    window_s: float,
    *,
    per_device: bool = True,
) -> dict[str, float]:
    """The `values` map of a closed window (see docs/architecture.md, "Control plane").

    Reads the PSI reference of the window's majority version from `references` (see the
    module docstring for how one is recorded).
    `per_device`: the window is one device's, so its declared uplink capacity is
    meaningful (a cohort's or the fleet's newest report would be an arbitrary device's).
    """
    v: dict[str, float] = {
        "events": float(acc.events),
        "events_per_s": acc.events / window_s,
        "offloads_per_s": acc.offloads / window_s,
        "audits_per_s": acc.audits / window_s,
        "offload_rate": _rate(acc.offloads, acc.events),
        # Audits are drawn among the samples at or above tau (LOCAL or AUDIT).
        "audit_rate": _rate(acc.audits, acc.events - acc.offloads),
        "verdicts": float(acc.verdicts),
        "disagreement_rate": _rate(sum(acc.v_disagree), acc.verdicts),
        "window_s": window_s,
    }
    for b in range(acc.buckets):
        v[bucket_key("conf", b)] = float(acc.conf[b])
        v[bucket_key("verdicts", b)] = float(acc.v_n[b])
        v[bucket_key("disagree", b)] = _rate(acc.v_disagree[b], acc.v_n[b])
        v[bucket_key("vw", b)] = acc.v_w[b]
        v[bucket_key("vwy", b)] = acc.v_wy[b]
        v[bucket_key("vw2", b)] = acc.v_w2[b]
    quantiles = (("latency", acc.latency), ("verdict_latency", acc.v_latency))
    for name, hist in (*quantiles, ("uplink_rtt", acc.rtt)):
        if sum(hist):
            v[f"{name}_p50_ms"] = latency_quantile(hist, 0.5)
            v[f"{name}_p99_ms"] = latency_quantile(hist, 0.99)
    if acc.uplink_n:
        v["uplink_bytes_per_s"] = acc.uplink_sum / acc.uplink_n
    if acc.statuses:
        v["outbox_depth"] = float(acc.outbox_max)
        v["statuses"] = float(acc.statuses)
        if per_device and acc.capacity is not None:
            v["uplink_capacity_bytes_per_s"] = acc.capacity
    if acc.lag_n:
        v["offload_lag_s"] = acc.lag_max_s
    version = _majority_version(acc)
    if version is not None:
        ref = references.get(version)
        v["psi_model_version"] = float(version)
        if ref is not None:
            value = psi(acc.conf, ref, settings.psi_epsilon)
            if not math.isnan(value):
                v["confidence_psi"] = value
    return v

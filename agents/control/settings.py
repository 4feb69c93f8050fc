"""Settings of the control plane (env prefix `EDGELOOP_CONTROL_`, nested with `__`).

One frozen model per part, grouped under `ControlSettings`; every default is documented
where it is declared, with the reason for its value. docs/architecture.md ("Control
plane") gives the equations these parameters enter.
"""

from __future__ import annotations

import itertools
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from edgeloop.artifacts.rollout import DEFAULT_CANARY_SHARE
from edgeloop.core.settings import _Base


# extra="forbid" on every part: a misspelled key inside a part's JSON form
# (EDGELOOP_CONTROL_THRESHOLD='{"latency_slo_mss": 5}') is refused, as a misspelled
# variable is (`_Base.check_env`), instead of leaving the default in force.
class SignalSettings(BaseModel):
    """Tumbling windows of stream signals (`ml.signals.v1`)."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False, extra="forbid")

    # Window length. A minute holds enough events per cohort for stable rates and a
    # histogram, and keeps the controller's reaction (a few windows) within minutes.
    window_s: float = Field(60.0, gt=0)
    # Event-time lateness a window still accepts after its end (Faust's `expires` minus the
    # window): device clocks and the outbox's catch-up after a reconnect deliver late. A
    # later event is counted (`late_dropped`) and dropped, never added to a closed window.
    allowed_lateness_s: float = Field(30.0, ge=0)
    # Fixed-width confidence buckets over [0, 1]. Changing it invalidates stored reference
    # histograms and the controller's estimates (they are per bucket).
    buckets: int = Field(20, ge=2, le=100)
    # Proportion added to every bucket before PSI, so an empty bucket is not ln(0).
    psi_epsilon: float = Field(1e-4, gt=0, lt=0.01)
    # A first window of a model version with at least this many events becomes its PSI
    # reference when no reference was recorded with the release.
    reference_min_events: int = Field(500, ge=1)


class ThresholdSettings(BaseModel):
    """The adaptive offload threshold controller (`control.thresholds.v1`)."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False, extra="forbid")

    # Offloads/s the cloud teacher sustains (all cohorts together), and the most the
    # cloud may spend: a saturated teacher measured below it lowers the capacity in force
    # (`teacher_capacity_per_s`, agents/control_stage.py), nothing raises it.
    cloud_capacity_per_s: float = Field(50.0, ge=1e-3)  # below, a backlog's drain time overflows
    # The workers' teacher is saturated, and its offloads/s are its capacity, when every
    # worker's verdict stage was busy at least this share of its span with at least
    # `measured_min_backlog` offloads waiting on its partitions.
    measured_min_busy: float = Field(0.8, gt=0, le=1)
    measured_min_backlog: int = Field(100, ge=1)
    # A worker's measurement counts while its newest tick is at most this old (seconds).
    measured_stale_s: float = Field(30.0, gt=0)
    # Lag is drained within this horizon: C_eff = C * (1 - lag_s / drain_horizon_s).
    drain_horizon_s: float = Field(120.0, gt=0)
    # C_eff never goes below this share of C (the audit floor must still be served).
    min_capacity_share: float = Field(0.1, gt=0, le=1)
    # Raising tau must fit the budget with this margin; noise then cannot push a settled
    # tau over the budget and back (the hysteresis band on load).
    headroom: float = Field(0.1, ge=0, lt=0.5)
    # An increase or a voluntary decrease of tau no larger than this is ignored (deadband).
    # One bucket (0.05 with 20 buckets) absorbs a bucket flipping on noise.
    deadband: float = Field(0.05, ge=0, le=0.5)
    # Voluntary changes (not forced by the budget) are taken only when they raise the
    # expected value V (errors fixed per second, net of min_error per call) by this share.
    min_gain: float = Field(0.1, ge=0, lt=1)
    # Largest voluntary change of tau per window. A decrease that the budget forces is
    # applied in full at once (overload must end within the documented bound).
    max_step: float = Field(0.2, gt=0, le=1)
    # Floor of the audit rate: the estimate above tau never goes blind.
    audit_floor: float = Field(0.02, gt=0, le=1)
    # Audit rate of a cohort whose PSI is above `psi_drift`: relearn its error profile.
    audit_drift: float = Field(0.1, gt=0, le=1)
    psi_drift: float = Field(0.25, gt=0)
    # A bucket whose expected edge error is below this is not worth a teacher call.
    min_error: float = Field(0.03, ge=0, le=1)
    # Beta prior strength (pseudo-samples) around the calibration prior 1 - confidence.
    prior_strength: float = Field(2.0, gt=0)
    # Strength (pseudo-samples) of the fleet's pooled curve as each cohort's prior.
    pool_strength: float = Field(20.0, gt=0)
    # Weight of past windows' verdict evidence per window (exponential forgetting), and
    # the faster forgetting of a drifting cohort.
    decay: float = Field(0.92, gt=0, lt=1)
    decay_drift: float = Field(0.3, gt=0, lt=1)
    # Weight of the newest window in the per-bucket traffic rate estimate (EWMA).
    rate_alpha: float = Field(0.5, gt=0, le=1)
    # Latency SLO of an offloaded decision: uplink RTT p99 + the teacher's service time p99
    # (not the wait behind a backlog: the budget drains that). A scope that cannot meet it
    # gets tau = 0 (audits only).
    latency_slo_ms: float = Field(2000.0, gt=0)
    # Share of a device's declared uplink capacity (DeviceStatus
    # `uplink_capacity_bytes_per_s`) its offloads may use, and the bytes per offload. Never
    # its measured traffic: that falls with tau and would ratchet the device to tau = 0.
    uplink_share: float = Field(0.5, gt=0, le=1)
    offload_bytes: float = Field(4096.0, gt=0)
    # What a scope runs before its first update: the edge's factory default
    # (EdgeSettings.tau, 0.8), so the first decision computes the load it really has.
    initial_tau: float = Field(0.8, ge=0, le=1)
    # How devices compute confidence; tau and the histograms mean that kind.
    confidence_kind: Literal["MAX_PROB", "MARGIN", "ENTROPY"] = "MAX_PROB"

    @model_validator(mode="after")
    def _audits_ordered(self) -> ThresholdSettings:
        if self.audit_drift < self.audit_floor:
            raise ValueError("audit_drift must be >= audit_floor")
        return self


class TriggerSettings(BaseModel):
    """Training triggers (`ml.training-triggers.v1`)."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False, extra="forbid")

    # COUNT: this many hard examples of the serving model version.
    hard_examples: int = Field(1000, ge=1)
    # DRIFT: PSI above `psi_bound` in `drift_windows` consecutive windows (PSI grows with
    # sample size, so one window over the rule-of-thumb 0.25 is not drift).
    psi_bound: float = Field(0.25, gt=0)
    drift_windows: int = Field(3, ge=1)
    # SCHEDULE: one trigger per slot of this length (event time, aligned to the epoch);
    # 0 disables it.
    schedule_s: float = Field(86_400.0, ge=0)
    # No two automatic triggers of a model closer than this (event time); a condition met
    # meanwhile waits and fires when the debounce ends, with the ranges known then.
    debounce_s: float = Field(600.0, ge=0)
    # A trigger covers at least this many hard examples (the trainer rejects empty ranges).
    min_examples: int = Field(1, ge=1)
    # The topic the ranges name (the trainer reads exactly these offsets).
    hard_example_topic: str = "ml.hard-examples.v1"


class JudgeSettings(BaseModel):
    """The rollout judge and the release state machine (`ml.model-releases.v1`)."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False, extra="forbid")

    # Kayenta recommends >= 50 data points per metric; fewer is "inconclusive, extend".
    min_samples: int = Field(50, ge=2)
    # One-sided significance level of every test (Kayenta judges at 98% confidence).
    alpha: float = Field(0.02, gt=0, lt=0.5)
    # Margins: how much worse the canary may be and still pass (absolute).
    disagreement_margin: float = Field(0.05, ge=0, le=1)
    offload_rate_margin: float = Field(0.05, ge=0, le=1)
    confidence_margin: float = Field(0.05, ge=0, le=1)  # Hodges-Lehmann shift, down
    latency_margin_ms: float = Field(2.0, ge=0)  # Hodges-Lehmann shift, up
    latency_margin_rel: float = Field(0.1, ge=0)  # ... or this share of control's median
    # Samples per arm and metric kept for the rank tests (bottom-k by event-id hash).
    max_samples: int = Field(2000, ge=50)
    # Share of the devices on the candidate at each stage: the canary, then the waves;
    # FULL (everyone) follows the last wave.
    canary_share: float = Field(DEFAULT_CANARY_SHARE, gt=0, lt=1)
    wave_shares: tuple[float, ...] = (0.25,)
    # Inconclusive windows a stage may extend before the candidate is rolled back: a
    # release is never promoted without evidence.
    max_extensions: int = Field(6, ge=0)

    @model_validator(mode="after")
    def _shares_grow(self) -> JudgeSettings:
        shares = (self.canary_share, *self.wave_shares)
        if any(b <= a for a, b in itertools.pairwise(shares)) or shares[-1] >= 1:
            raise ValueError("canary_share < wave_shares... must increase and stay below 1")
        return self


class WiringSettings(BaseModel):
    """How the control plane runs inside `edgeloop agents` (agents/control_app.py)."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False, extra="forbid")

    # Run the control agents in the worker.
    enabled: bool = True
    # The model the training triggers name (the trainer's `models`).
    model_name: str = "digits-student"
    # Clock ticks appended to the control log: an idle stream still closes its windows.
    tick_s: float = Field(1.0, gt=0)
    # OffloadRequests awaiting their CloudVerdict (oldest forgotten first, counted).
    max_pending_requests: int = Field(20_000, ge=1)
    # Records of the control log handled per batch (one table write per batch).
    batch_max: int = Field(2000, ge=1)
    batch_within_s: float = Field(0.2, gt=0)


class ControlSettings(_Base):
    """All control-plane parameters (env `EDGELOOP_CONTROL_<PART>__<NAME>`)."""

    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
        env_prefix="EDGELOOP_CONTROL_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    signals: SignalSettings = SignalSettings()
    threshold: ThresholdSettings = ThresholdSettings()
    triggers: TriggerSettings = TriggerSettings()
    judge: JudgeSettings = JudgeSettings()
    wiring: WiringSettings = WiringSettings()

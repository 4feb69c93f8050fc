"""The rollout judge and the release state machine (`ml.model-releases.v1`).

A release from `train serve` (a CANARY ModelRelease) starts a rollout. Inference events
and verdicts are sorted into two arms by the model version that produced them: the
candidate (canary arm) and its parent (control arm), so a device that is mid-update
counts for the model it really ran. At each window end the judge compares the arms,
metric by metric, each needing `min_samples` per arm (Kayenta recommends 50):

  disagreement   share of teacher verdicts that disagree with the edge: two-proportion
                 z-test. FAIL if significantly higher (one-sided, level alpha) by more
                 than the margin; PASS if the one-sided upper bound of the difference is
                 below the margin (non-inferior); else INCONCLUSIVE.
  offload_rate   share of events offloaded: the same test and rule.
  confidence     Mann-Whitney U; FAIL if the canary is significantly lower and its
                 Hodges-Lehmann shift is below -margin; else PASS.
  latency        Mann-Whitney U; FAIL if significantly higher and the shift exceeds
                 max(margin_ms, margin_rel * control median); else PASS.

Any FAIL fails the stage; else any INCONCLUSIVE (too few samples included) extends it:
the arms keep accumulating into the next window; after `max_extensions` the candidate is
rolled back, because a release is never promoted without evidence. All PASS promotes:
CANARY -> WAVE 1..n -> FULL. FAIL -> ROLLBACK to the parent version. Each step is one
ModelRelease whose `reason` (JSON) carries the verdict, every metric's numbers, the share
of devices and the membership rule.

Membership: a device is in the rollout at share s iff
int(sha256("<model>:<version>:<device>")[:16], 16) / 2^64 < s. Deterministic (a restart
picks the same devices) and monotone in s (canary devices stay in every later wave).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeloop.agents.control.settings import JudgeSettings
from edgeloop.agents.control.stats import mann_whitney, two_proportion
from edgeloop.agents.ids import derived_id

# The devices' own membership rule (edge and judge must agree on who is in a stage's share),
# one definition, in the module the edge daemon imports.
from edgeloop.artifacts.rollout import membership_score


def _hash01(event_id: str) -> float:
    return int(hashlib.sha256(event_id.encode()).hexdigest()[:16], 16) / 2.0**64


@dataclass(slots=True)
class BottomK:
    """A deterministic, order-independent sample of at most k values: those whose event
    ids hash lowest. A redelivered event has the same hash and is kept once."""

    k: int
    keys: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, event_id: str, value: float) -> None:
        """Offer one value."""
        h = _hash01(event_id)
        i = bisect.bisect_left(self.keys, h)
        if i < len(self.keys) and self.keys[i] == h:
            return
        if len(self.keys) >= self.k and i >= self.k:
            return
        self.keys.insert(i, h)
        self.values.insert(i, value)
        del self.keys[self.k :], self.values[self.k :]


@dataclass(slots=True)
class Arm:
    """One arm's evidence over the stage so far.

    The counters assume deduplicated input (the dedupe stage runs first); the rank-test
    samples dedupe themselves by event id.
    """

    k: int
    events: int = 0
    offloads: int = 0
    verdicts: int = 0
    disagreements: int = 0
    confidence: BottomK = field(init=False)
    latency: BottomK = field(init=False)

    def __post_init__(self) -> None:
        self.confidence, self.latency = BottomK(self.k), BottomK(self.k)

    def add_event(self, event_id: str, confidence: float, latency_ms: float, offload: bool) -> None:
        """One InferenceEvent of this arm's model version."""
        self.events += 1
        self.offloads += offload
        self.confidence.add(event_id, confidence)
        self.latency.add(event_id, latency_ms)

    def add_verdict(self, agree: bool) -> None:
        """One teacher verdict on a sample of this arm's model version."""
        self.verdicts += 1
        self.disagreements += not agree


@dataclass(frozen=True, slots=True)
class MetricResult:
    """One metric's outcome and the numbers behind it."""

    name: str
    outcome: str  # PASS | FAIL | INCONCLUSIVE
    n_canary: int
    n_control: int
    canary: float
    control: float
    effect: float  # difference of proportions, or Hodges-Lehmann shift
    p_value: float
    detail: str


@dataclass(frozen=True, slots=True)
class Judgement:
    """The judge's verdict on one window: PASS, FAIL or INCONCLUSIVE, and why."""

    verdict: str
    score: float  # share of metrics that passed
    metrics: tuple[MetricResult, ...]


def _proportion(
    name: str, canary: tuple[int, int], control: tuple[int, int], margin: float, s: JudgeSettings
) -> MetricResult:
    """PASS / FAIL / INCONCLUSIVE of a proportion (k, n) per arm; higher is worse."""
    (k1, n1), (k0, n0) = canary, control
    if min(n1, n0) < s.min_samples:
        return MetricResult(
            name,
            "INCONCLUSIVE",
            n1,
            n0,
            0,
            0,
            0,
            1.0,
            f"too few samples ({n1} vs {n0} < {s.min_samples}): extend",
        )
    t = two_proportion(k1, n1, k0, n0, s.alpha)
    if t.p_value < s.alpha and t.diff > margin:
        outcome, detail = "FAIL", f"higher by {t.diff:.4f} > margin {margin} (p={t.p_value:.2g})"
    elif t.upper < margin:
        outcome, detail = "PASS", f"upper bound {t.upper:.4f} < margin {margin}"
    else:
        outcome, detail = "INCONCLUSIVE", f"upper bound {t.upper:.4f} >= margin {margin}: extend"
    return MetricResult(name, outcome, n1, n0, t.p_canary, t.p_control, t.diff, t.p_value, detail)


def judge(canary: Arm, control: Arm, s: JudgeSettings) -> Judgement:
    """Compare the arms on the four metrics (module docstring).

    Args:
        canary: the candidate version's evidence.
        control: the parent version's evidence.
        s: the judge's settings (margins, alpha, minimum samples).

    Returns:
        The verdict and each metric's result.
    """
    results = [
        _proportion(
            "disagreement",
            (canary.disagreements, canary.verdicts),
            (control.disagreements, control.verdicts),
            s.disagreement_margin,
            s,
        ),
        _proportion(
            "offload_rate",
            (canary.offloads, canary.events),
            (control.offloads, control.events),
            s.offload_rate_margin,
            s,
        ),
    ]
    for name, x, y in (
        ("confidence", canary.confidence.values, control.confidence.values),
        ("latency", canary.latency.values, control.latency.values),
    ):
        if min(len(x), len(y)) < s.min_samples:
            results.append(
                MetricResult(
                    name,
                    "INCONCLUSIVE",
                    len(x),
                    len(y),
                    0,
                    0,
                    0,
                    1.0,
                    f"too few samples ({len(x)} vs {len(y)}): extend",
                )
            )
            continue
        r = mann_whitney(x, y)
        med1, med0 = statistics.median(x), statistics.median(y)
        if name == "confidence":
            bad, p, limit = r.shift < -s.confidence_margin, r.p_less, -s.confidence_margin
        else:
            limit = max(s.latency_margin_ms, s.latency_margin_rel * med0)
            bad, p = r.shift > limit, r.p_greater
        outcome = "FAIL" if bad and p < s.alpha else "PASS"
        detail = f"Hodges-Lehmann shift {r.shift:.4g} (limit {limit:.4g}), p={p:.2g}"
        results.append(MetricResult(name, outcome, len(x), len(y), med1, med0, r.shift, p, detail))
    outcomes = [m.outcome for m in results]
    verdict = (
        "FAIL" if "FAIL" in outcomes else "INCONCLUSIVE" if "INCONCLUSIVE" in outcomes else "PASS"
    )
    return Judgement(verdict, outcomes.count("PASS") / len(outcomes), tuple(results))


@dataclass(slots=True)
class RolloutState:
    """One rollout (a Faust table keyed by cohort); `start` builds it from the trainer's
    CANARY release, with the parent's artifact (its FULL release) for a rollback."""

    model_name: str
    cohort: str
    version: int
    parent_version: int
    artifact_url: str
    manifest_sha256: str
    parent_artifact_url: str
    parent_manifest_sha256: str
    target: str
    max_samples: int
    stage: str = "CANARY"
    wave: int = 0
    extensions: int = 0
    last_window_end_us: int = 0
    canary: Arm = field(init=False)
    control: Arm = field(init=False)

    def __post_init__(self) -> None:
        self.canary, self.control = Arm(self.max_samples), Arm(self.max_samples)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RolloutState:
        """Inverse of `to_json`."""
        d = {k: v for k, v in data.items() if k not in ("canary", "control")}
        state = cls(**d)
        for name in ("canary", "control"):
            a = data[name]
            arm = Arm(a["k"], a["events"], a["offloads"], a["verdicts"], a["disagreements"])
            arm.confidence = BottomK(**a["confidence"])
            arm.latency = BottomK(**a["latency"])
            setattr(state, name, arm)
        return state

    @property
    def done(self) -> bool:
        return self.stage in ("FULL", "ROLLBACK")

    def arm(self, model_version: int) -> Arm | None:
        """The arm a record of `model_version` counts for (None: neither version)."""
        if self.done:
            return None
        if model_version == self.version:
            return self.canary
        return self.control if model_version == self.parent_version else None


def start(
    release: Mapping[str, Any], parent_release: Mapping[str, Any], settings: JudgeSettings
) -> RolloutState:
    """A rollout from the trainer's CANARY release and the parent's (FULL) release.

    Raises:
        ValueError: `release` is not a CANARY with a parent version, or `parent_release`
            is not that parent.
    """
    if release["stage"] != "CANARY" or release.get("parent_version") is None:
        raise ValueError("a rollout starts from a CANARY release that names its parent")
    if int(parent_release["model_version"]) != int(release["parent_version"]):
        raise ValueError(
            f"parent release is v{parent_release['model_version']}, the canary names "
            f"v{release['parent_version']}"
        )
    return RolloutState(
        model_name=str(release["model_name"]),
        cohort=str(release["cohort"]),
        version=int(release["model_version"]),
        parent_version=int(release["parent_version"]),
        artifact_url=str(release["artifact_url"]),
        manifest_sha256=str(release["manifest_sha256"]),
        parent_artifact_url=str(parent_release["artifact_url"]),
        parent_manifest_sha256=str(parent_release["manifest_sha256"]),
        target=str(release["target"]),
        max_samples=settings.max_samples,
    )


def share(state: RolloutState, settings: JudgeSettings) -> float:
    """Share of the cohort's devices that run the candidate at the current stage."""
    if state.stage == "CANARY":
        return settings.canary_share
    if state.stage == "WAVE":
        return settings.wave_shares[state.wave - 1]
    return 1.0 if state.stage == "FULL" else 0.0


def in_rollout(device_id: str, state: RolloutState, settings: JudgeSettings) -> bool:
    """Whether the device runs the candidate at the current stage."""
    return membership_score(state.model_name, state.version, device_id) < share(state, settings)


def judge_window(
    window_end_us: int, state: RolloutState, settings: JudgeSettings
) -> tuple[list[dict[str, Any]], Judgement | None]:
    """Judge the stage at a window end; promote, extend or roll back.

    Returns:
        The ModelRelease records of the step taken (none when extending, when the rollout
        is over, or for a window at or before the last one judged: a replay), and the
        judgement (None when nothing was judged).
    """
    if state.done or window_end_us <= state.last_window_end_us:
        return [], None
    state.last_window_end_us = window_end_us
    j = judge(state.canary, state.control, settings)
    before = (state.stage, state.wave)
    if j.verdict == "FAIL":
        state.stage = "ROLLBACK"
        why = "judge failed the candidate"
    elif j.verdict == "INCONCLUSIVE":
        state.extensions += 1
        if state.extensions <= settings.max_extensions:
            return [], j
        state.stage = "ROLLBACK"
        why = f"inconclusive after {state.extensions} windows: never promoted without evidence"
    elif state.wave < len(settings.wave_shares):
        state.stage, state.wave = "WAVE", state.wave + 1
        why = "judge passed the candidate"
    else:
        state.stage, state.wave = "FULL", state.wave + 1
        why = "judge passed the candidate"
    state.extensions = 0
    state.canary, state.control = Arm(state.max_samples), Arm(state.max_samples)
    reason = {
        "step": f"{before[0]}/{before[1]} -> {state.stage}/{state.wave}",
        "why": why,
        "verdict": j.verdict,
        "score": j.score,
        "metrics": [asdict(m) for m in j.metrics],
        "share": share(state, settings),
        "membership": "sha256('<model>:<version>:<device>')[:16] / 2^64 < share",
        "window_end_us": window_end_us,
    }
    rollback = state.stage == "ROLLBACK"
    version = state.parent_version if rollback else state.version
    return [
        {
            "event_id": derived_id(
                "release",
                f"{state.model_name}:{state.version}:{state.cohort}:{state.stage}:{state.wave}",
            ),
            "ts": window_end_us,
            "model_name": state.model_name,
            "model_version": version,
            "cohort": state.cohort,
            "stage": state.stage,
            "wave": state.wave,
            "artifact_url": state.parent_artifact_url if rollback else state.artifact_url,
            "manifest_sha256": (
                state.parent_manifest_sha256 if rollback else state.manifest_sha256
            ),
            "target": state.target,
            # The version this step replaces: the candidate itself for a rollback.
            "parent_version": state.version if rollback else state.parent_version,
            "reason": json.dumps(reason, sort_keys=True, separators=(",", ":")),
        }
    ], j

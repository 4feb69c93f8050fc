"""The release gate: a pure decision over measured numbers, recorded with its reasons.

A candidate is released only if it
  - beats the serving model on the drifted/hard holdout by at least `min_drift_gain`,
  - loses at most `max_clean_drop` accuracy on the clean holdout,
  - and its int8 model meets the edge budget (size, p99 latency, peak memory).
No torch here: the decision is testable and re-checkable from the recorded JSON alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgeloop.trainer.budget import BudgetMeasurement, EdgeBudget


@dataclass(frozen=True)
class Scores:
    clean: float
    drifted: float


@dataclass(frozen=True)
class GatePolicy:
    max_clean_drop: float = 0.02
    # Strictly better is required; a gain of 0 would let a no-op retrain release.
    min_drift_gain: float = 0.01
    budget: EdgeBudget = field(default_factory=EdgeBudget)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]
    candidate: Scores
    serving: Scores | None
    budget: BudgetMeasurement
    policy: GatePolicy

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reasons": list(self.reasons),
            "candidate": asdict(self.candidate),
            "serving": asdict(self.serving) if self.serving else None,
            "budget": asdict(self.budget),
            "policy": asdict(self.policy),
        }


def decide(
    candidate: Scores,
    serving: Scores | None,
    measured: BudgetMeasurement,
    policy: GatePolicy | None = None,
) -> GateDecision:
    """`serving` None means there is no model in the field yet (bootstrap): only the
    budget applies. `reasons` lists every failed check, not just the first."""
    p = policy or GatePolicy()
    reasons: list[str] = []
    if serving is not None:
        gain = candidate.drifted - serving.drifted
        if gain < p.min_drift_gain:
            reasons.append(
                f"drifted holdout accuracy {candidate.drifted:.4f} does not beat "
                f"serving {serving.drifted:.4f} by {p.min_drift_gain:.4f} "
                f"(gain {gain:+.4f})"
            )
        drop = serving.clean - candidate.clean
        if drop > p.max_clean_drop:
            reasons.append(
                f"clean holdout accuracy fell {drop:.4f} (serving {serving.clean:.4f}"
                f" -> {candidate.clean:.4f}), more than {p.max_clean_drop:.4f}"
            )
    b = p.budget
    if measured.size_bytes > b.max_size_bytes:
        reasons.append(f"int8 model size {measured.size_bytes} B > budget {b.max_size_bytes} B")
    if measured.p99_ms > b.max_p99_ms:
        reasons.append(f"p99 latency {measured.p99_ms:.3f} ms > budget {b.max_p99_ms} ms")
    if measured.peak_mem_mb > b.max_peak_mem_mb:
        reasons.append(f"peak memory {measured.peak_mem_mb:.1f} MB > budget {b.max_peak_mem_mb} MB")
    return GateDecision(
        passed=not reasons,
        reasons=tuple(reasons),
        candidate=candidate,
        serving=serving,
        budget=measured,
        policy=p,
    )

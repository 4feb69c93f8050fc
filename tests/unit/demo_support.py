"""Frames built by hand for the demo's dashboard and report tests."""

from __future__ import annotations

from edgeloop.demo.observe import CohortView, Frame


def view(cohort: str, accuracy: float | None, **kw: object) -> CohortView:
    fields: dict[str, object] = {
        "cohort": cohort,
        "accuracy": accuracy,
        "accuracy_by_version": {1: accuracy} if accuracy is not None else {},
        "frames": 0,
        "offload_rate_per_s": None,
        "audit_rate_per_s": None,
        "budget_per_s": None,
        "tau": None,
        "tau_version": None,
        "hard_examples": None,
        "model_versions": {},
        "release_stage": None,
    }
    fields.update(kw)
    return CohortView(**fields)  # type: ignore[arg-type]


def frame(t_s: float, phase: str, *views: CohortView, **kw: object) -> Frame:
    fields: dict[str, object] = {
        "t_s": t_s,
        "phase": phase,
        "cohorts": {v.cohort: v for v in views},
        "events_per_s": {},
        "latency_p99_ms": {},
        "training": None,
        "up": {},
    }
    fields.update(kw)
    return Frame(**fields)  # type: ignore[arg-type]

"""The release gate refuses what it must, and says why."""

from __future__ import annotations

from edgeloop.trainer.budget import BudgetMeasurement, EdgeBudget
from edgeloop.trainer.gate import GatePolicy, Scores, decide
from edgeloop.trainer.interconnect import topo_has_nvlink

OK_BUDGET = BudgetMeasurement(size_bytes=50_000, p50_ms=0.05, p99_ms=0.1, peak_mem_mb=10.0)
SERVING = Scores(clean=0.98, drifted=0.55)


def test_better_candidate_passes() -> None:
    d = decide(Scores(clean=0.975, drifted=0.78), SERVING, OK_BUDGET)
    assert d.passed
    assert d.reasons == ()


def test_worse_candidate_on_drift_is_refused() -> None:
    d = decide(Scores(clean=0.98, drifted=0.50), SERVING, OK_BUDGET)
    assert not d.passed
    assert "drifted holdout" in d.reasons[0]


def test_equal_candidate_is_refused() -> None:
    assert not decide(SERVING, SERVING, OK_BUDGET).passed


def test_clean_regression_beyond_margin_is_refused() -> None:
    d = decide(
        Scores(clean=0.95, drifted=0.80), SERVING, OK_BUDGET, GatePolicy(max_clean_drop=0.02)
    )
    assert not d.passed
    assert "clean holdout accuracy fell 0.0300" in d.reasons[0]
    # The same drop inside a wider margin passes.
    assert decide(
        Scores(clean=0.95, drifted=0.80), SERVING, OK_BUDGET, GatePolicy(max_clean_drop=0.05)
    ).passed


def test_budget_violations_are_all_listed() -> None:
    fat = BudgetMeasurement(size_bytes=10_000_000, p50_ms=9.0, p99_ms=20.0, peak_mem_mb=500.0)
    d = decide(Scores(clean=0.99, drifted=0.9), SERVING, fat, GatePolicy(budget=EdgeBudget()))
    assert not d.passed
    assert [r.split()[0] for r in d.reasons] == ["int8", "p99", "peak"]


def test_bootstrap_without_serving_model_checks_budget_only() -> None:
    assert decide(Scores(clean=0.5, drifted=0.1), None, OK_BUDGET).passed


def test_decision_is_recorded_as_json_ready_dict() -> None:
    doc = decide(Scores(clean=0.9, drifted=0.5), SERVING, OK_BUDGET).to_dict()
    assert doc["passed"] is False
    assert doc["serving"] == {"clean": 0.98, "drifted": 0.55}
    assert doc["policy"]["max_clean_drop"] == 0.02


def test_nvlink_is_read_from_the_topology_matrix() -> None:
    nvlink = "\tGPU0\tGPU1\nGPU0\t X \tNV18\nGPU1\tNV18\t X \n  NV#  = bonded NVLinks"
    pcie = "\tGPU0\tGPU1\nGPU0\t X \tPIX\nGPU1\tPIX\t X \n  NV#  = bonded NVLinks"
    assert topo_has_nvlink(nvlink)
    assert not topo_has_nvlink(pcie)

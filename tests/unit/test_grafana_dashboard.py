"""The Grafana dashboard (deploy/grafana/edgeloop.json) queries only metrics the services
declare, with PromQL that fits their types; and the extractor that reads its queries.

Whether the series really appear on a running service's /metrics is the integration test
tests/integration/test_grafana_metrics.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from edgeloop.agents.control_app import ControlMetrics
from edgeloop.agents.metrics import AgentMetrics
from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.streams.metrics import BridgeMetrics
from edgeloop.trainer.serve_metrics import TrainerMetrics
from tests.grafana import (
    Selector,
    declared_samples,
    exposition_samples,
    load_dashboard,
    metric_names,
    panels,
    queries,
    selectors,
    type_problems,
    unknown_metrics,
)


def _declared() -> dict[str, str]:
    """Sample name -> type for every collector of the services the dashboard covers."""
    control = CollectorRegistry()
    ControlMetrics(control)
    out: dict[str, str] = {}
    for registry in (
        BridgeMetrics().registry,
        AgentMetrics().registry,
        control,
        EdgeMetrics().registry,
        TrainerMetrics().registry,
    ):
        out.update(declared_samples(registry))
    return out


# ---- the extractor ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('edgeloop_control_tau{cohort=~"$cohort"}', {"edgeloop_control_tau"}),
        # functions, aggregations with `by` before and after, ranges with variables
        (
            "histogram_quantile(0.99, sum by (le, stage) "
            "(rate(edgeloop_edge_decision_latency_seconds_bucket[$__rate_interval])))",
            {"edgeloop_edge_decision_latency_seconds_bucket"},
        ),
        ("sum(rate(a_total[5m])) by (kind) / ignoring(kind) group_left sum(b)", {"a_total", "b"}),
        ("max without (instance) (g) > bool on (job) group_right (x) h", {"g", "h"}),
        # label values that look like metric names, strings, numbers and durations
        ('x{kind="edgeloop_fake_total", le="+Inf"} offset 5m', {"x"}),
        ('count_values("version", v{kind="model"}) * 1e3 + 0x1F - .5', {"v"}),
        ('label_replace(a, "dst", "$1", "src", "(.*)") or vector(0)', {"a"}),
        ("rate(c_total[1h:30s] @ end()) unless d and e", {"c_total", "d", "e"}),
        ('{__name__="by_name_total", job="x"}', {"by_name_total"}),
        ("a:recorded:rate5m # a comment with words\n + b", {"a:recorded:rate5m", "b"}),
        ("sum(x) / ${DS} + [[var]] * Inf - NaN", {"x"}),
        (
            "topk(3, sum by (topic) (edgeloop_agents_consumer_lag))",
            {"edgeloop_agents_consumer_lag"},
        ),
    ],
)
def test_extractor_finds_metric_names_and_nothing_else(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_extractor_records_enclosing_functions() -> None:
    sel = selectors("histogram_quantile(0.9, sum by (le) (rate(h_bucket[5m]))) / sum(g)")
    assert sel == [
        Selector("h_bucket", ("histogram_quantile", "sum", "rate")),
        Selector("g", ("sum",)),
    ]


@pytest.mark.parametrize("expr", ["sum(rate(x[5m])", 'x{a="b}', "sum by (le) x", "a)"])
def test_extractor_refuses_malformed_promql(expr: str) -> None:
    with pytest.raises(ValueError, match=r"unbalanced|unterminated|without its expression"):
        selectors(expr)


def test_exposition_samples_are_sample_names_not_family_names() -> None:
    text = (
        "# HELP edgeloop_bridge_dlq_total Messages dead-lettered\n"
        "# TYPE edgeloop_bridge_dlq_total counter\n"
        "# HELP h Latency\n# TYPE h histogram\n"
        'h_bucket{le="0.1"} 1.0\nh_count 1.0\nh_sum 0.05\n'
        "g 3.0\n"
    )
    # A labelled counter nobody observed has HELP/TYPE lines and no sample.
    assert exposition_samples(text) == {"h_bucket", "h_count", "h_sum", "g"}


def test_unknown_metrics_names_the_panel_and_the_metric() -> None:
    dashboard = {
        "panels": [
            {"type": "row", "title": "r", "panels": [
                {"title": "nested", "targets": [{"expr": "rate(edgeloop_bridge_dlq[5m])"}]},
            ]},
            {"title": "ok", "targets": [{"expr": "sum(rate(edgeloop_bridge_dlq_total[5m]))"}]},
            {"title": "typo", "targets": [{"expr": "edgeloop_control_tua", "refId": "A"}]},
        ],
        "templating": {"list": [
            {"name": "cohort", "type": "query", "query": "label_values(nope_metric, cohort)"},
        ]},
    }  # fmt: skip
    known = set(_declared())
    assert unknown_metrics(dashboard, known) == [
        ("nested", "edgeloop_bridge_dlq"),  # the counter's family name, not its sample name
        ("typo", "edgeloop_control_tua"),
        ("variable $cohort", "nope_metric"),
    ]


# ---- the dashboard ---------------------------------------------------------------------


def test_dashboard_queries_only_metrics_the_services_declare() -> None:
    missing = unknown_metrics(load_dashboard(), set(_declared()))
    assert not missing, "panels query metrics no service declares: " + "; ".join(
        f"{panel!r}: {name}" for panel, name in missing
    )


def test_dashboard_promql_fits_the_metric_types() -> None:
    problems = type_problems(load_dashboard(), _declared())
    assert not problems, problems


def test_type_problems_finds_misused_series() -> None:
    dashboard = {"panels": [{"title": "p", "targets": [
        {"expr": "rate(edgeloop_control_tau[5m])"},  # rate over a gauge
        {"expr": "edgeloop_bridge_dlq_total"},  # a raw counter
        {"expr": "histogram_quantile(0.9, sum by (stage) "
                 "(rate(edgeloop_edge_decision_latency_seconds_bucket[5m])))"},  # no le
        {"expr": "histogram_quantile(0.9, rate(edgeloop_trainer_training_seconds_sum[1h]))"},
        {"expr": "sum(rate(edgeloop_agents_teacher_batch_size_sum[5m]))"},  # fine
    ]}]}  # fmt: skip
    assert type_problems(dashboard, _declared()) == [
        "p: rate over gauge edgeloop_control_tau",
        "p: counter edgeloop_bridge_dlq_total charted without rate/increase",
        "p: histogram_quantile aggregated without le",
        "p: histogram_quantile over edgeloop_trainer_training_seconds_sum",
    ]


def test_dashboard_model() -> None:
    dash = load_dashboard()
    assert dash["schemaVersion"] >= 38
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["cohort"]["type"] == "query"
    assert variables["cohort"]["includeAll"] and variables["cohort"]["multi"]
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    charts: list[Any] = [p for p in panels(dash) if p["type"] != "row"]
    for p in charts:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
    titles = " | ".join(p["title"] for p in charts)
    for wanted in ("offload rate vs budget", "τ per cohort", "Hard examples", "Release",
                   "Uplink", "Downlink", "consumer lag", "Trainer", "Decisions"):  # fmt: skip
        assert wanted in titles, wanted
    # The cohort variable filters the per-cohort panels.
    per_cohort = [q for q in queries(dash) if "cohort" in q.panel.lower()]
    assert per_cohort and all("$cohort" in q.expr for q in per_cohort if "variable" not in q.panel)


def test_release_panel_shows_a_full_release_the_judge_did_not_take() -> None:
    """The release gauge used to follow only the judge's own steps, so a cohort running an
    operator-published FULL release (the bootstrap model) had no series until a rollout
    completed: the dashboard's release panel stayed empty."""
    from edgeloop.agents.control.settings import ControlSettings
    from edgeloop.agents.control_app import RELEASES_TOPIC
    from edgeloop.agents.control_stage import ControlState, ControlStep

    registry = CollectorRegistry()
    metrics = ControlMetrics(registry)
    state = ControlState()
    step = ControlStep(ControlSettings())
    full = {"k": "rel", "model_name": "digits-student", "model_version": 1, "cohort": "north",
            "stage": "FULL", "wave": 0, "artifact_url": "http://store/1/", "share": 1.0,
            "manifest_sha256": "0" * 64, "target": "pi5-cpu", "parent_version": None}  # fmt: skip
    outputs = step.apply(full, 0, state)
    assert not [o for o in outputs if o[0] == RELEASES_TOPIC]  # the judge took no step
    metrics.observe(outputs, state)
    value = registry.get_sample_value(
        "edgeloop_control_release_version", {"cohort": "north", "stage": "FULL"}
    )
    assert value == 1.0

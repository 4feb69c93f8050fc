"""The demo's observer: real `/metrics` endpoints on loopback (the services' own
collectors, served as the services serve them), a clock the test moves."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest
from prometheus_client import CollectorRegistry, Gauge

from edgeloop.core.metrics import serve_metrics
from edgeloop.demo.observe import Observer, Target
from edgeloop.demo.scrape import quantile
from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.infra.ports import free_port
from edgeloop.streams.metrics import BridgeMetrics


class Control:
    """The control plane's gauges under their exported names (agents/control_app.py)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.tau = Gauge("edgeloop_control_tau", "t", ["cohort"], registry=r)
        self.version = Gauge("edgeloop_control_threshold_version", "v", ["cohort"], registry=r)
        self.budget = Gauge("edgeloop_control_budget_per_s", "b", registry=r)
        self.hard = Gauge("edgeloop_control_hard_examples_since_trigger", "h", registry=r)
        self.release = Gauge(
            "edgeloop_control_release_version", "r", ["cohort", "stage"], registry=r
        )


def dead_port() -> int:
    return free_port()  # nothing listens there, and no later server in this run gets it


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def stack() -> AsyncIterator[tuple[EdgeMetrics, BridgeMetrics, Control, list[Target]]]:
    edge, bridge, control = EdgeMetrics(), BridgeMetrics(), Control()
    async with AsyncExitStack() as es:
        targets = []
        for name, reg in (("fleet", edge.registry), ("bridge", bridge.registry),
                          ("agents-1", control.registry)):  # fmt: skip
            port = await es.enter_async_context(serve_metrics(reg, port=0))
            targets.append(Target(name, f"http://127.0.0.1:{port}/metrics"))
        targets.append(Target("trainer", f"http://127.0.0.1:{dead_port()}/metrics"))
        yield edge, bridge, control, targets


async def test_rolling_accuracy_rates_versions_and_a_dead_target(
    stack: tuple[EdgeMetrics, BridgeMetrics, Control, list[Target]],
) -> None:
    edge, bridge, control, targets = stack
    clock = Clock()
    obs = Observer(targets, ["a", "b"], window_s=10.0, clock=clock)
    pred = edge.predictions
    pred.labels("a", "1", "true").inc(8)
    pred.labels("a", "1", "false").inc(2)
    edge.applied_version.labels("dev-1", "a", "model").set(1)
    edge.applied_version.labels("dev-2", "a", "model").set(1)
    control.tau.labels("a").set(0.7)
    control.version.labels("a").set(3)
    control.budget.set(5.0)
    control.release.labels("a", "FULL").set(1)

    first = await obs.poll("steady")
    assert first.up == {"fleet": True, "bridge": True, "agents-1": True, "trainer": False}
    a = first.cohorts["a"]
    assert a.frames == 10
    assert a.accuracy is None  # no earlier scrape to compare with
    assert (a.tau, a.tau_version, a.budget_per_s) == (0.7, 3, 5.0)
    assert a.model_versions == {1: 2}
    assert a.release_stage == "FULL v1"

    # Drift: the next 10 s are mostly wrong.
    clock.t += 10
    pred.labels("a", "1", "true").inc(1)
    pred.labels("a", "1", "false").inc(9)
    second = await obs.poll("drift")
    assert second.cohorts["a"].accuracy == pytest.approx(0.1)
    assert second.cohorts["a"].frames == 20

    # A canary: v2 on one device, right 9 times in 10; 20 offloads and 100 events in 10 s.
    clock.t += 10
    edge.applied_version.labels("dev-2", "a", "model").set(2)
    control.release.labels("a", "CANARY").set(2)
    pred.labels("a", "2", "true").inc(9)
    pred.labels("a", "2", "false").inc(1)
    edge.decisions.labels("dev-1", "a", "OFFLOAD").inc(20)
    edge.published.labels("dev-1", "inference").inc(100)
    bridge.uplink_out.labels("inference").inc(100)
    for _ in range(100):
        edge.publish_latency.labels("dev-1").observe(0.004)
        bridge.added_latency.observe(0.0009)
    third = await obs.poll("canary")
    a = third.cohorts["a"]
    # The window is the last 10 s: v1's earlier frames are out of it.
    assert a.accuracy == pytest.approx(0.9)
    assert a.accuracy_by_version == {2: pytest.approx(0.9)}
    assert a.model_versions == {1: 1, 2: 1}
    assert a.release_stage == "CANARY v2"  # the gauge that changed is the newest step
    assert a.offload_rate_per_s == pytest.approx(2.0)
    assert a.offloads == 20
    assert (a.frames, a.correct) == (30, 18)
    assert third.events_per_s["device"] == pytest.approx(10.0)
    assert third.events_per_s["bridge"] == pytest.approx(10.0)
    assert 2.0 < third.latency_p99_ms["device_to_broker"] <= 5.0
    assert 0.75 < third.latency_p99_ms["bridge_to_kafka"] <= 1.0
    assert third.latency_p99_ms["device_to_kafka"] == pytest.approx(
        third.latency_p99_ms["device_to_broker"] + third.latency_p99_ms["bridge_to_kafka"]
    )
    assert third.up["trainer"] is False
    assert "b" in third.cohorts and third.cohorts["b"].frames == 0

    assert obs.value("edgeloop_edge_predictions_total", cohort="a") == 30
    assert obs.value("edgeloop_edge_predictions_total", cohort="a", correct="true") == 18
    assert obs.value("edgeloop_no_such_metric") is None
    assert [v for _, v in obs.series("a", "accuracy")] == pytest.approx([0.1, 0.9])
    assert [t for t, _ in obs.series("a", "frames")] == [0.0, 10.0, 20.0]
    m = obs.mark("release", "CANARY v2")
    assert m.t_s == 20.0 and obs.marks == [m]
    # The per-frame stage histograms are left out before parsing (the fleet's largest
    # family); the decisions counter, whose name shares their prefix, is kept.
    edge.latency.labels("dev-1", "total").observe(0.001)
    await obs.poll("canary")
    assert obs.value("edgeloop_edge_decision_latency_seconds_count") is None
    assert obs.value("edgeloop_edge_decisions_total", decision="OFFLOAD") == 20


async def test_a_restarted_fleet_is_a_counter_reset_not_a_negative_rate(
    stack: tuple[EdgeMetrics, BridgeMetrics, Control, list[Target]],
) -> None:
    edge, _, _, targets = stack
    clock = Clock()
    obs = Observer(targets[:1], ["a"], window_s=10.0, clock=clock)
    edge.predictions.labels("a", "1", "true").inc(50)
    await obs.poll("steady")
    # The fleet process restarted: its counters begin again at zero.
    edge.predictions.clear()
    edge.predictions.labels("a", "1", "true").inc(3)
    edge.predictions.labels("a", "1", "false").inc(1)
    clock.t += 10
    frame = await obs.poll("steady")
    assert frame.cohorts["a"].accuracy == pytest.approx(0.75)


def test_quantile_interpolates_inside_the_bucket() -> None:
    cumulative = {0.001: 0.0, 0.002: 50.0, 0.005: 100.0, float("inf"): 100.0}
    assert quantile(0.5, cumulative) == pytest.approx(0.002)
    assert quantile(0.99, cumulative) == pytest.approx(0.002 + 0.003 * 49 / 50)
    assert quantile(0.99, {0.001: 0.0, float("inf"): 0.0}) is None
    # Beyond the last finite bound: the histogram knows no more than that bound.
    assert quantile(0.99, {0.001: 0.0, float("inf"): 10.0}) == 0.001


async def test_control_gauges_come_from_the_worker_holding_the_control_log() -> None:
    holder, stale = Control(), Control()
    holder.tau.labels("a").set(0.6)
    holder.version.labels("a").set(5)
    holder.budget.set(5.0)
    # The worker that held the control log before a failover keeps its last values.
    stale.tau.labels("a").set(0.9)
    stale.version.labels("a").set(2)
    stale.budget.set(3.0)
    async with AsyncExitStack() as es:
        targets = [
            Target(
                name, f"http://127.0.0.1:{await es.enter_async_context(serve_metrics(r))}/metrics"
            )
            for name, r in (("agents-1", stale.registry), ("agents-2", holder.registry))
        ]
        frame = await Observer(targets, ["a"]).poll("steady")
    a = frame.cohorts["a"]
    assert (a.tau, a.tau_version, a.budget_per_s, frame.budget_per_s) == (0.6, 5, 5.0, 5.0)

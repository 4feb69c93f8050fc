"""The figures of `edgeloop bench e2e` (edgeloop/bench/e2e_figures.py): what a reader
of its table takes from it — per-stage p50/p99, each stage's share of the whole, events
delivered and missing, verdicts back, and whether the issue's target (p99 <= 20 ms at
5,000 events/s) was met and why not — computed from synthetic timestamps."""

from __future__ import annotations

import json
import math
from pathlib import Path

from edgeloop.bench.e2e_bench import control_reaction
from edgeloop.bench.e2e_figures import (
    COLUMNS,
    Stamps,
    cores_line,
    rate_figures,
    table_rows,
    target,
)

T0 = 1_800_000_000.0


def _stamps(n: int, *, bridge_s: float, agents_s: float, rate: float = 1000.0,
            lost: int = 0, verdict_s: float = 0.05) -> Stamps:  # fmt: skip
    """n events published 1/rate apart; each stage takes the same time; the last `lost`
    events never reach the enriched topic; one offload per ten events."""
    pub = {f"d:{i}": T0 + i / rate for i in range(n)}
    bridged = {k: t + bridge_s for k, t in pub.items()}
    kept = list(pub)[: n - lost]
    enriched = {k: bridged[k] + agents_s for k in kept}
    offloads = {f"o:{i}": T0 + i / rate for i in range(0, n, 10)}
    return Stamps(
        offered_per_s=rate, send_seconds=n / rate, published=pub,
        acked={k: t + 0.001 for k, t in pub.items()}, bridged=bridged, enriched=enriched,
        offloads=offloads, verdicts={k: t + verdict_s for k, t in list(offloads.items())[1:]},
        consumed={k: t + 0.002 for k, t in bridged.items()},
    )  # fmt: skip


def test_stage_latencies_and_shares_come_from_the_timestamps() -> None:
    f = rate_figures(_stamps(1000, bridge_s=0.002, agents_s=0.008))
    assert math.isclose(f["publish_to_enriched"]["p50_ms"], 10.0, abs_tol=1e-3)
    assert math.isclose(f["stages"]["bridge"]["p99_ms"], 2.0, abs_tol=1e-3)
    assert math.isclose(f["stages"]["agents"]["p99_ms"], 8.0, abs_tol=1e-3)
    # Shares are of the mean: they add up to the whole.
    assert math.isclose(f["shares"]["bridge"], 0.2, abs_tol=1e-3)
    assert math.isclose(f["shares"]["agents"], 0.8, abs_tol=1e-3)
    assert math.isclose(f["broker_ack"]["p50_ms"], 1.0, abs_tol=1e-3)
    assert math.isclose(f["kafka_to_bare_consumer"]["p50_ms"], 2.0, abs_tol=1e-3)


def test_percentiles_see_the_slow_tail() -> None:
    s = _stamps(1000, bridge_s=0.001, agents_s=0.004)
    slow = dict(s.enriched)
    for k in list(slow)[-20:]:  # 2% of events take 1 s more in the agents
        slow[k] += 1.0
    f = rate_figures(Stamps(**{**s.__dict__, "enriched": slow}))
    assert f["publish_to_enriched"]["p50_ms"] < 10
    assert f["publish_to_enriched"]["p99_ms"] > 1000
    assert math.isclose(f["publish_to_enriched"]["max_ms"], 1005.0, abs_tol=1e-3)


def test_every_event_is_accounted_for_delivered_or_missing() -> None:
    f = rate_figures(_stamps(500, bridge_s=0.001, agents_s=0.001, lost=7))
    assert (f["events"], f["enriched"], f["missing"], f["in_kafka"]) == (500, 493, 7, 500)
    # One of the 50 offloads got no verdict.
    assert (f["offloads"], f["verdicts"], f["verdicts_missing"]) == (50, 49, 1)


def test_the_table_has_a_row_per_path_and_stage_with_the_counts() -> None:
    slow = _stamps(5000, bridge_s=0.002, agents_s=0.5, rate=5000.0, lost=3)
    per_rate = [rate_figures(_stamps(1000, bridge_s=0.002, agents_s=0.008)), rate_figures(slow)]
    rows = table_rows(per_rate)
    assert len(rows) == 12 and all(list(r) == COLUMNS for r in rows)
    whole = [r for r in rows if r["path"].startswith("publish -> enriched")]
    assert [r["delivered"] for r in whole] == ["1000/1000", "4997/5000"]
    assert [r["missing"] for r in whole] == [0, 3]
    verdicts = [r for r in rows if r["path"].startswith("offload")]
    assert [r["delivered"] for r in verdicts] == ["99/100", "499/500"]
    # Each row's p99 against the broker's own PUBACK p99 of the same rate (1 ms).
    assert math.isclose(whole[0]["p99_vs_baseline"], 10.0, rel_tol=1e-3)


def test_the_target_says_why_it_was_missed() -> None:
    fast = rate_figures(_stamps(5000, bridge_s=0.002, agents_s=0.008, rate=5000.0))
    assert target([fast], 5000.0, 20.0) == {"target_met": True, "reason": "met"}
    slow = rate_figures(_stamps(5000, bridge_s=0.002, agents_s=0.5, rate=5000.0, lost=3))
    got = target([slow], 5000.0, 20.0)
    assert got["target_met"] is False
    assert "3 of 5000 events not enriched" in got["reason"]
    assert "p99 502.0 ms > 20 ms" in got["reason"]
    assert target([fast], 1000.0, 20.0)["reason"] == "1000/s was not run"


def test_the_pipeline_behind_the_offered_rate_misses_the_target() -> None:
    s = _stamps(5000, bridge_s=0.002, agents_s=0.008, rate=5000.0)
    # The agents enriched the same events, but over four times the span: 1,250/s.
    late = {k: T0 + 4 * (t - T0) + 0.01 for k, t in s.enriched.items()}
    got = target([rate_figures(Stamps(**{**s.__dict__, "enriched": late}))], 5000.0, 1e9)
    assert got["target_met"] is False
    assert "the pipeline enriched" in got["reason"]


def test_control_reaction_is_read_from_its_json_or_named(tmp_path: Path) -> None:
    assert control_reaction(tmp_path)["note"] == "run `edgeloop bench control`"
    (tmp_path / "control.json").write_text(json.dumps({
        "machine": {"time": "2026-11-29T10:00:00Z"},
        "summary": {"drift_reaction_p50_s": 3.3, "drift_reaction_p99_s": 7.7, "window_s": 3.0},
    }))  # fmt: skip
    got = control_reaction(tmp_path)
    assert (got["drift_reaction_p99_s"], got["measured"]) == (7.7, "2026-11-29T10:00:00Z")


def test_the_cores_line_lists_each_process_largest_first_with_the_total() -> None:
    line = cores_line({"kafka": 0.61, "devices": 0.9, "bridge": 0.2, "total": 1.71}, 2)
    assert line == "1.71 of 2 cores: devices 0.90, kafka 0.61, bridge 0.20"
    assert cores_line({}, 2) == "not measured (no /proc)"

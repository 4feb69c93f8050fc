"""The demo's report: loop efficacy from a scripted run, and the report directory
(report.json, PNGs, report.md) from an observer whose frames are built by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeloop.demo.lineage import ReleaseLineage
from edgeloop.demo.observe import Mark, Observer
from edgeloop.demo.report import loop_efficacy, write_report
from tests.unit.demo_support import frame, view

SHA = "5e" * 32


def scripted_run() -> Observer:
    """60 s, one frame per second. `drifted`: 10 frames/s, 9 right before the drift at
    20 s, 5 right until the release at 40 s, 8 right after. `clean`: 10 frames/s, all
    right until 40 s, 9 right after. During the drift `drifted` offloads 1 frame/s and
    audits one every 2 s."""
    obs = Observer([], ["drifted", "clean"], window_s=10.0)
    d = {"frames": 0, "correct": 0, "offloads": 0, "audits": 0}
    c = {"frames": 0, "correct": 0}
    for t in range(61):
        if t > 0:
            d["frames"] += 10
            d["correct"] += 9 if t <= 20 else 5 if t <= 40 else 8
            c["frames"] += 10
            c["correct"] += 10 if t <= 40 else 9
            if 20 < t <= 40:
                d["offloads"] += 1
                d["audits"] += t % 2 == 0
        phase = "steady" if t <= 20 else "drift" if t <= 40 else "released"
        acc = 0.9 if t <= 20 else 0.5 if t <= 40 else 0.8
        obs.frames.append(
            frame(
                float(t),
                phase,
                view(
                    "drifted",
                    acc,
                    tau=0.8 if t <= 25 else 0.6,
                    tau_version=1 + (t > 25),
                    offload_rate_per_s=1.0 if 20 < t <= 40 else 0.1,
                    budget_per_s=2.0,
                    hard_examples=t,
                    model_versions={1: 3} if t <= 40 else {2: 3},
                    release_stage=None if t <= 40 else "FULL v2",
                    **d,
                ),
                view(
                    "clean", 1.0 if t <= 40 else 0.9, offload_rate_per_s=0.2, budget_per_s=2.0, **c
                ),
                events_per_s={"device": 40.0, "bridge": 40.0},
                latency_p99_ms={"device_to_kafka": 8.0 + t / 10, "offload_to_verdict": 30.0},
                training="training trigger abc… epoch 2/5" if 30 <= t <= 35 else None,
                up={"bridge": True, "trainer": t != 33},
                uplink_bytes=1000.0 * t,
                hard_examples_total=2.0 * t,
                budget_per_s=2.0,
            )
        )
    obs.marks += [
        Mark(0.0, "phase", "steady"),
        Mark(20.0, "phase", "drift in drifted"),
        Mark(40.0, "release", "FULL v2"),
        Mark(50.0, "release", "CANARY v3 (bad, operator override)"),
        Mark(55.0, "rollback", "ROLLBACK to v2"),
    ]
    return obs


def test_loop_efficacy_on_a_scripted_run() -> None:
    obs = scripted_run()
    e = loop_efficacy(obs, drifted="drifted", drift_at_s=20.0, release_at_s=40.0, until_s=50.0)
    assert e["accuracy_before"] == pytest.approx(0.9)
    assert e["accuracy_after_drift"] == pytest.approx(0.5)
    assert e["accuracy_after_release"] == pytest.approx(0.8)
    assert e["lost"] == pytest.approx(0.4)
    assert e["recovered_share"] == pytest.approx(0.75)
    assert e["uploaded_share"] == pytest.approx(30 / 200)  # 20 offloads + 10 audits
    assert e["uploaded_share_run"] == pytest.approx(30 / 600)
    assert e["clean_before"] == pytest.approx(1.0)
    assert e["clean_after"] == pytest.approx(0.9)
    assert e["clean_change"] == pytest.approx(-0.1)
    # No release: nothing recovered, and the drift interval runs to the end.
    none = loop_efficacy(obs, drifted="drifted", drift_at_s=20.0, release_at_s=None)
    assert none["recovered_share"] is None and none["accuracy_after_release"] is None
    assert none["accuracy_after_drift"] == pytest.approx((100 + 160) / 400)


async def test_report_directory_holds_every_file_and_figure(tmp_path: Path) -> None:
    obs = scripted_run()
    lineage = [
        ReleaseLineage(
            model="digits-student", version=2, parent_version=1, trigger_id="trig-7f3a",
            trigger_reason="DRIFT", offset_ranges={"ml.hard-examples.v1/0": [0, 149]},
            training_run="runs/retrain-trig-7f3a", manifest_sha256=SHA,
            artifact_url="http://127.0.0.1/digits-student/2/",
            steps=[{"stage": "CANARY", "wave": 0, "cohort": "drifted", "share": 0.05, "ts": 1,
                    "reason": {"trigger_id": "trig-7f3a"}},
                   {"stage": "FULL", "wave": 0, "cohort": "drifted", "share": 1.0, "ts": 2,
                    "reason": {"step": "full"}}],
        ),
        # An operator's release with the gate overridden: no trigger, the reason is the
        # operator's (the demo's bad v3 showed "-" here).
        ReleaseLineage(
            model="digits-student", version=3, parent_version=2, trigger_id=None,
            trigger_reason=None, offset_ranges={}, training_run=None, manifest_sha256=SHA,
            artifact_url="http://127.0.0.1/digits-student/3/",
            steps=[{"stage": "CANARY", "wave": 0, "cohort": "drifted", "share": 0.7, "ts": 3,
                    "reason": {"operator": "ada", "gate": "overridden",
                               "override": "demo bad release"}}],
        ),
    ]  # fmt: skip
    note = "v3 went out with the operator override `--skip-gate` (logged)"
    scenario = {"drifted": "drifted", "drift_at_s": 20.0, "devices": 6, "notes": [note]}
    out = tmp_path / "report"
    written = await write_report(out, obs, scenario=scenario, lineage=lineage,
                                 extra={"events_delivered": 1234})  # fmt: skip

    pngs = ["accuracy.png", "offload.png", "tau.png", "latency.png", "hard_examples_uplink.png"]
    assert written["plots"] == pngs
    for name in [*pngs, "report.json", "report.md"]:
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "report.json").read_text())
    assert doc == json.loads(json.dumps(written, default=str))
    # The timeline came from the marks: release = first release after the drift, and the
    # after-release interval ends at the bad release.
    assert doc["timeline"] == {"drifted": "drifted", "drift_at_s": 20.0, "release_at_s": 40.0,
                               "until_s": 50.0}  # fmt: skip
    assert doc["efficacy"]["recovered_share"] == pytest.approx(0.75)
    segs = {s["label"]: s["accuracy"] for s in doc["cohorts"]["drifted"]["segments"]}
    assert segs["before drift"] == pytest.approx(0.9)
    assert segs["after drift"] == pytest.approx(0.5)
    assert segs["after release FULL v2"] == pytest.approx(0.8)
    assert doc["offload_vs_budget"]["within_budget_share"] == 1.0
    assert doc["latency"]["p99_ms_max"]["device_to_kafka"] == pytest.approx(14.0)
    assert doc["uplink_bytes"] == 60000.0
    assert doc["hard_examples"]["routed_total"] == 120.0
    assert doc["lineage"][0]["trigger_id"] == "trig-7f3a"
    assert doc["extra"] == {"events_delivered": 1234}
    assert len(doc["series"]["t_s"]) == 61
    assert doc["series"]["up"]["trainer"].count(False) == 1
    assert [m["kind"] for m in doc["marks"]] == ["phase", "phase", "release", "release", "rollback"]

    md = (out / "report.md").read_text()
    for text in ("75.0%", "90.0%", "50.0%", "80.0%", "15.0%", "trig-7f3a", "DRIFT",
                 "ml.hard-examples.v1/0 0..149", "runs/retrain-trig-7f3a", SHA[:16],
                 "drifted CANARY 0.05", "--skip-gate", "![latency.png](latency.png)",
                 "bucket", "operator ada, gate overridden: demo bad release"):  # fmt: skip
        assert text in md, text


async def test_a_run_without_frames_still_writes_the_report(tmp_path: Path) -> None:
    doc = await write_report(tmp_path, Observer([], ["a"]), scenario={}, lineage=[])
    assert doc["plots"] == [] and doc["efficacy"] is None
    assert "no release was read" in (tmp_path / "report.md").read_text()

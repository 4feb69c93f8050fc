"""The demo's report directory: report.json (every figure), PNG plots, report.md.

Everything comes from the observer's frames and marks (the services' own metrics, with
accuracy counted by the simulator against ground truth) and from the releases' lineage
read back from Kafka (`lineage.read_lineage`).

Where the scenario's timeline comes from: `scenario` may carry `drifted` (the drifted
cohort), `drift_at_s`, `release_at_s` (when the good release reached its cohort) and
`efficacy_until_s` (the end of the "after release" interval, e.g. when the bad release
went out), all on the observer's clock. What it leaves out is taken from the marks: the
first `phase` mark mentioning "drift", the first `release` mark after it, the next
`release` mark after that.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgeloop.demo.lineage import ReleaseLineage
from edgeloop.demo.observe import HISTOGRAMS, Frame, Mark, Observer

SERIES_FIELDS = ("accuracy", "frames", "correct", "offload_rate_per_s", "audit_rate_per_s",
                 "tau", "tau_version", "hard_examples", "offloads", "audits")  # fmt: skip


def _at(frames: Sequence[Frame], t_s: float) -> Frame:
    """The newest frame at or before `t_s` (the first frame when none is)."""
    best = frames[0]
    for f in frames:
        if f.t_s <= t_s:
            best = f
    return best


def _counts(
    frames: Sequence[Frame], cohorts: Sequence[str], t1: float, t2: float
) -> dict[str, int]:
    """Increase of the cumulative cohort counters between the frames at t1 and t2."""
    a, b = _at(frames, t1), _at(frames, t2)
    out = {"correct": 0, "frames": 0, "offloads": 0, "audits": 0}
    for c in cohorts:
        va, vb = a.cohorts.get(c), b.cohorts.get(c)
        if vb is None:
            continue
        for k in out:
            out[k] += max(0, getattr(vb, k) - (getattr(va, k) if va is not None else 0))
    return out


def _acc(n: Mapping[str, int]) -> float | None:
    return n["correct"] / n["frames"] if n["frames"] else None


def loop_efficacy(
    observer: Observer,
    *,
    drifted: str,
    drift_at_s: float,
    release_at_s: float | None,
    until_s: float | None = None,
    settle_s: float = 0.0,
) -> dict[str, float | None]:
    """How much of the accuracy lost to drift one automatic retrain won back, at what
    upload cost (issue 11's loop efficacy), from the cumulative ground-truth counters.

    Intervals on the observer's clock (each figure is Δcorrect / Δframes between the
    frames at an interval's ends, so it is exact, not an average of rolling values):
    before = [first frame, drift_at_s]; after_drift = [drift_at_s + settle_s, release_at_s
    (or the last frame)]; after_release = [release_at_s + settle_s, until_s (or the last
    frame)].

    - lost = accuracy_before - accuracy_after_drift
    - recovered_share = (accuracy_after_release - accuracy_after_drift) / lost (None when
      nothing was lost or there is no release)
    - uploaded_share = (Δoffloads + Δaudits) / Δframes of the drifted cohort over
      [drift_at_s, release_at_s]: the share of its inputs uploaded to get there
      (`uploaded_share_run`: the same over the whole run)
    - clean_change = accuracy of the other cohorts (pooled) after the release - before
      the drift

    Args:
        observer: the run's observer (its frames).
        drifted: the drifted cohort.
        drift_at_s: when the drift began.
        release_at_s: when the release reached the cohort (None: there was none).
        until_s: the end of the after-release interval (default: the last frame).
        settle_s: seconds skipped after a boundary before accuracy is counted again.

    Returns:
        The figures above (None where undefined).
    """
    frames = observer.frames
    if not frames:
        return dict.fromkeys(("accuracy_before", "accuracy_after_drift", "accuracy_after_release",
                              "lost", "recovered_share", "uploaded_share", "uploaded_share_run",
                              "clean_before", "clean_after", "clean_change"))  # fmt: skip
    first, last = frames[0].t_s, frames[-1].t_s
    cohorts = list(frames[-1].cohorts)
    clean = [c for c in cohorts if c != drifted]
    end_drift = release_at_s if release_at_s is not None else last
    before = _counts(frames, [drifted], first, drift_at_s)
    after_drift = _counts(frames, [drifted], drift_at_s + settle_s, end_drift)
    acc_before, acc_drift = _acc(before), _acc(after_drift)
    acc_release = clean_after = None
    end = until_s if until_s is not None else last
    if release_at_s is not None:
        acc_release = _acc(_counts(frames, [drifted], release_at_s + settle_s, end))
        clean_after = _acc(_counts(frames, clean, release_at_s + settle_s, end))
    clean_before = _acc(_counts(frames, clean, first, drift_at_s))
    lost = acc_before - acc_drift if acc_before is not None and acc_drift is not None else None
    recovered = None
    if lost is not None and lost > 0 and acc_release is not None and acc_drift is not None:
        recovered = (acc_release - acc_drift) / lost
    to_release = _counts(frames, [drifted], drift_at_s, end_drift)
    run = _counts(frames, [drifted], first, last)

    def uploaded(n: Mapping[str, int]) -> float | None:
        return (n["offloads"] + n["audits"]) / n["frames"] if n["frames"] else None

    return {
        "accuracy_before": acc_before,
        "accuracy_after_drift": acc_drift,
        "accuracy_after_release": acc_release,
        "lost": lost,
        "recovered_share": recovered,
        "uploaded_share": uploaded(to_release),
        "uploaded_share_run": uploaded(run),
        "clean_before": clean_before,
        "clean_after": clean_after,
        "clean_change": (clean_after - clean_before)
        if clean_after is not None and clean_before is not None
        else None,
    }


def _timeline(observer: Observer, scenario: Mapping[str, Any]) -> dict[str, Any]:
    marks = observer.marks
    drift = scenario.get("drift_at_s")
    if drift is None:
        drift = next((m.t_s for m in marks if m.kind == "phase" and "drift" in m.text.lower()),
                     None)  # fmt: skip
    releases = [m for m in marks if m.kind == "release"]
    release = scenario.get("release_at_s")
    if release is None and drift is not None:
        release = next((m.t_s for m in releases if m.t_s >= drift), None)
    until = scenario.get("efficacy_until_s")
    if until is None and release is not None:
        until = next((m.t_s for m in releases if m.t_s > release), None)
    return {"drifted": scenario.get("drifted"), "drift_at_s": drift, "release_at_s": release,
            "until_s": until}  # fmt: skip


def _segments(observer: Observer, cohort: str, drift: float | None) -> list[dict[str, Any]]:
    """Accuracy of `cohort` between consecutive events: before drift, after drift, after
    each release or rollback mark."""
    frames = observer.frames
    bounds: list[tuple[float, str]] = [(frames[0].t_s, "start")]
    if drift is not None:
        bounds.append((drift, "after drift"))
    bounds += [(m.t_s, f"after {m.kind} {m.text}") for m in observer.marks
               if m.kind in ("release", "rollback")]  # fmt: skip
    bounds.sort(key=lambda b: b[0])
    bounds.append((frames[-1].t_s, "end"))
    out = []
    for (t1, label), (t2, _) in itertools.pairwise(bounds):
        if t2 <= t1:
            continue
        n = _counts(frames, [cohort], t1, t2)
        name = "before drift" if label == "start" and drift is not None else label
        out.append({"label": name, "from_s": t1, "to_s": t2, "accuracy": _acc(n), **n})
    return out


def _series(observer: Observer) -> dict[str, Any]:
    frames = observer.frames
    cohorts = list(dict.fromkeys(c for f in frames for c in f.cohorts))
    stages = list(dict.fromkeys(s for f in frames for s in f.events_per_s))
    lat = list(dict.fromkeys(k for f in frames for k in f.latency_p99_ms))
    services = list(dict.fromkeys(s for f in frames for s in f.up))

    def fleet_offloads(f: Frame) -> float | None:
        rates = [
            v.offload_rate_per_s for v in f.cohorts.values() if v.offload_rate_per_s is not None
        ]
        return sum(rates) if rates else None

    return {
        "t_s": [f.t_s for f in frames],
        "phase": [f.phase for f in frames],
        "cohorts": {
            c: {
                **{
                    k: [getattr(f.cohorts[c], k) if c in f.cohorts else None for f in frames]
                    for k in SERIES_FIELDS
                },
                "accuracy_by_version": [
                    {str(v): a for v, a in f.cohorts[c].accuracy_by_version.items()}
                    if c in f.cohorts
                    else {}
                    for f in frames
                ],
                "model_versions": [
                    {str(v): n for v, n in f.cohorts[c].model_versions.items()}
                    if c in f.cohorts
                    else {}
                    for f in frames
                ],
                "release_stage": [
                    f.cohorts[c].release_stage if c in f.cohorts else None for f in frames
                ],
            }
            for c in cohorts
        },
        "events_per_s": {s: [f.events_per_s.get(s) for f in frames] for s in stages},
        "latency_p99_ms": {k: [f.latency_p99_ms.get(k) for f in frames] for k in lat},
        "fleet_offloads_per_s": [fleet_offloads(f) for f in frames],
        "budget_per_s": [f.budget_per_s for f in frames],
        "uplink_bytes": [f.uplink_bytes for f in frames],
        "hard_examples_total": [f.hard_examples_total for f in frames],
        "training": [f.training for f in frames],
        "up": {s: [f.up.get(s) for f in frames] for s in services},
    }


def _cdf(buckets: Mapping[float, float]) -> list[list[float]]:
    total = buckets.get(float("inf"), max(buckets.values(), default=0.0))
    if total <= 0:
        return []
    return [[le * 1000.0, n / total] for le, n in sorted(buckets.items()) if le != float("inf")]


def _budget_figures(series: Mapping[str, Any]) -> dict[str, Any]:
    pairs = [(o, b) for o, b in zip(series["fleet_offloads_per_s"], series["budget_per_s"],
                                    strict=True) if o is not None and b is not None]  # fmt: skip
    half = pairs[len(pairs) // 2 :]  # the second half: after the controller settled
    return {
        "frames_compared": len(pairs),
        "within_budget_share": sum(o <= b * 1.05 for o, b in pairs) / len(pairs) if pairs else None,
        "within_budget_share_second_half": (
            sum(o <= b * 1.05 for o, b in half) / len(half) if half else None
        ),
        "fleet_offloads_per_s_max": max((o for o, _ in pairs), default=None),
        "fleet_offloads_per_s_median": statistics.median([o for o, _ in pairs]) if pairs else None,
        "budget_per_s_last": pairs[-1][1] if pairs else None,
    }


def build_report(
    observer: Observer,
    *,
    scenario: Mapping[str, Any],
    lineage: Sequence[ReleaseLineage],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report.json dict (no files written; see `write_report`)."""
    frames = observer.frames
    tl = _timeline(observer, scenario)
    series = _series(observer)
    efficacy = None
    if tl["drifted"] is not None and tl["drift_at_s"] is not None and frames:
        efficacy = loop_efficacy(observer, drifted=tl["drifted"], drift_at_s=tl["drift_at_s"],
                                 release_at_s=tl["release_at_s"], until_s=tl["until_s"],
                                 settle_s=float(scenario.get("settle_s", 0.0)))  # fmt: skip
    last = frames[-1] if frames else None
    p99 = series["latency_p99_ms"]
    return {
        "scenario": dict(scenario),
        "extra": dict(extra or {}),
        "window_s": observer.window_s,
        "duration_s": last.t_s if last else 0.0,
        "timeline": tl,
        "efficacy": efficacy,
        "cohorts": {
            c: {
                "segments": _segments(observer, c, tl["drift_at_s"]) if frames else [],
                "last": asdict(v),
            }
            for c, v in (last.cohorts.items() if last else ())
        },
        "offload_vs_budget": _budget_figures(series),
        "latency": {
            "p99_ms_median": {
                k: statistics.median(v)
                for k, ys in p99.items()
                if (v := [y for y in ys if y is not None])
            },
            "p99_ms_max": {
                k: max(v) for k, ys in p99.items() if (v := [y for y in ys if y is not None])
            },
            "cdf": {k: _cdf(observer.histogram(name)) for k, name in HISTOGRAMS.items()},
        },
        "hard_examples": {
            "routed_total": last.hard_examples_total if last else None,
            "uncovered_last": next(iter(last.cohorts.values())).hard_examples
            if last and last.cohorts
            else None,
        },
        "uplink_bytes": last.uplink_bytes if last else None,
        "lineage": [asdict(e) for e in lineage],
        "marks": [asdict(m) for m in observer.marks],
        "series": series,
    }


async def write_report(
    out_dir: Path,
    observer: Observer,
    *,
    scenario: Mapping[str, Any],
    lineage: Sequence[ReleaseLineage],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write report.json, the PNGs and report.md into `out_dir` (created if missing).

    Args:
        out_dir: the report directory.
        observer: the run's observer (frames and marks).
        scenario: the scenario's options (and its timeline, see the module docstring).
        lineage: every release's lineage (`lineage.read_lineage`).
        extra: anything else to keep in report.json (e.g. the e2e test's counts).

    Returns:
        The dict written to report.json (with `plots`, the PNG names).

    Raises:
        OSError: the directory cannot be written.
        ImportError: matplotlib is missing (it is in the trainer extra).
    """
    report = build_report(observer, scenario=scenario, lineage=lineage, extra=extra)
    await asyncio.to_thread(_write, out_dir, report)
    return report


def _write(out_dir: Path, report: dict[str, Any]) -> None:
    from edgeloop.demo.markdown import render_markdown
    from edgeloop.demo.plots import draw_all

    out_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = draw_all(report, out_dir) if report["series"]["t_s"] else []
    tmp = out_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    tmp.replace(out_dir / "report.json")
    (out_dir / "report.md").write_text(render_markdown(report))


__all__ = ["Mark", "build_report", "loop_efficacy", "write_report"]

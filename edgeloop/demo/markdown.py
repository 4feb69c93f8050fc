"""report.md: the report's figures as a story a newcomer can read (headline, plots, lineage)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

GOAL_RECOVERED, GOAL_UPLOADED = 0.80, 0.05


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f} points"


def _num(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def _headline(r: Mapping[str, Any]) -> list[str]:
    out = ["## Headline", ""]
    e = r.get("efficacy")
    tl = r["timeline"]
    if e:
        lost = _num(None if e["lost"] is None else 100 * e["lost"])
        out += [
            f"- Drifted cohort **{tl['drifted']}**: accuracy {_pct(e['accuracy_before'])} before "
            f"the drift, {_pct(e['accuracy_after_drift'])} after it (lost {lost} points), "
            f"{_pct(e['accuracy_after_release'])} after the automatic release.",
            f"- Recovered share of the lost accuracy: **{_pct(e['recovered_share'])}** "
            f"(goal ≥ {_pct(GOAL_RECOVERED)}), uploading **{_pct(e['uploaded_share'])}** of the "
            f"cohort's inputs between drift and release (offloads + audits; goal ≤ "
            f"{_pct(GOAL_UPLOADED)}; {_pct(e['uploaded_share_run'])} over the whole run).",
            f"- Undrifted cohorts: {_pct(e['clean_before'])} before the drift, "
            f"{_pct(e['clean_after'])} after the release ({_pts(e['clean_change'])}).",
        ]
    else:
        out.append("- No drift in this run's timeline: no loop-efficacy figures.")
    b = r["offload_vs_budget"]
    out.append(
        f"- Fleet offloads within the cloud budget (5% tolerance) in "
        f"{_pct(b['within_budget_share_second_half'])} of the frames of the run's second half "
        f"({_pct(b['within_budget_share'])} overall); median "
        f"{_num(b['fleet_offloads_per_s_median'], '.2f')}/s, last budget "
        f"{_num(b['budget_per_s_last'], '.2f')}/s."
    )
    med = r["latency"]["p99_ms_median"]
    if med:
        shown = ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(med.items()))
        out.append(f"- p99 latency (median over windows): {shown}.")
    out.append(
        f"- Hard examples routed: {_num(r['hard_examples']['routed_total'], ',.0f')}; "
        f"offloaded input bytes: {_num(r['uplink_bytes'], ',.0f')}."
    )
    return [*out, ""]


def _segments(r: Mapping[str, Any]) -> list[str]:
    out = ["## Accuracy per cohort, between the run's events", "",
           "| cohort | interval | from s | to s | accuracy | frames |",
           "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for cohort, c in r["cohorts"].items():
        for s in c["segments"]:
            out.append(f"| {cohort} | {s['label']} | {s['from_s']:.0f} | {s['to_s']:.0f} | "
                       f"{_pct(s['accuracy'])} | {s['frames']} |")  # fmt: skip
    return [*out, ""]


PLOT_TEXT = {
    "accuracy.png": "Accuracy per cohort against the simulator's labels (rolling window), with "
    "the scenario's phases (grey), releases (green) and rollbacks (red): the drifted "
    "cohort drops at the drift and climbs back once the retrained model reaches it.",
    "offload.png": "Offloads per second per cohort and for the fleet, against the controller's "
    "effective cloud budget (red dashed): after the drift the controller moves tau so the "
    "fleet's offloads come back under the budget.",
    "tau.png": "The offload threshold tau the controller set per cohort (its versions step "
    "the line).",
    "latency.png": "Left: latency CDFs per stage over the whole run, at the resolution of the "
    "services' histogram buckets (cumulative Prometheus histograms give no finer CDF). "
    "Right: p99 per rolling window. device_to_kafka is the sum of the device's "
    "created->PUBACK p99 and the bridge's receive->Kafka-ack p99 (no histogram spans both "
    "processes); offload_to_verdict is measured on the device.",
    "hard_examples_uplink.png": "Hard examples routed to the trainer (cumulative, and those not "
    "yet covered by a trigger), and the input bytes devices offloaded.",
}


def _why(e: Mapping[str, Any]) -> str:
    """The lineage row's reason: the trigger's, else an operator's release (who, and the
    gate override's reason when the gate was overridden)."""
    if e.get("trigger_reason"):
        return str(e["trigger_reason"])
    for step in e["steps"]:
        reason = step.get("reason")
        if isinstance(reason, dict) and "operator" in reason:
            who = f"operator {reason['operator']}"
            if reason.get("gate") == "overridden":
                return f"{who}, gate overridden: {reason.get('override', '')}".rstrip(": ")
            return f"{who}, gate passed" if reason.get("gate") == "passed" else who
    return "-"


def _lineage(r: Mapping[str, Any]) -> list[str]:
    out = ["## Lineage of each release", "",
           "| version | parent | trigger | reason | offset ranges | training run | "
           "artifact sha256 | steps (cohort stage wave share) |",
           "|---:|---:|---|---|---|---|---|---|"]  # fmt: skip
    for e in r["lineage"]:
        ranges = "; ".join(f"{k} {v[0]}..{v[1]}" for k, v in e["offset_ranges"].items()) or "-"
        steps = "; ".join(
            f"{s['cohort']} {s['stage']}{' ' + str(s['wave']) if s['wave'] else ''}"
            f" {s['share'] if s['share'] is not None else ''}".rstrip()
            for s in e["steps"]
        )
        out.append(
            f"| v{e['version']} | v{e['parent_version']} | {e['trigger_id'] or '-'} | "
            f"{_why(e)} | {ranges} | {e['training_run'] or '-'} | "
            f"`{e['manifest_sha256'][:16]}…` | {steps} |"
        )
    if not r["lineage"]:
        out.append("| - | - | - | - | - | - | - | no release was read |")
    read = r["extra"].get("lineage_read") or {}
    if read and not read.get("complete", True):
        out += ["", "Incomplete: the release or trigger topic was not read to its end in "
                f"time{' (' + read['error'] + ')' if read.get('error') else ''}; the table "
                "shows what was read."]  # fmt: skip
    if read.get("undecodable_skipped"):
        out += ["", f"{read['undecodable_skipped']} records that do not decode were skipped."]
    return [*out, ""]


def render_markdown(r: Mapping[str, Any]) -> str:
    """report.md from the report dict (see `report.build_report`)."""
    out = ["# edgeloop demo report", "",
           f"Run of {r['duration_s']:.0f} s; rolling window {r['window_s']:g} s. "
           "Every figure is in `report.json`.", ""]  # fmt: skip
    out += _headline(r)
    notes = [*r["scenario"].get("notes", []), *r["extra"].get("notes", [])]
    if notes:
        out += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    out += _segments(r)
    out += ["## Plots", ""]
    for name in r.get("plots", []):
        out += [f"![{name}]({name})", "", PLOT_TEXT.get(name, ""), ""]
    out += _lineage(r)
    out += ["## Marks", "", "| t s | kind | text |", "|---:|---|---|"]
    out += [f"| {m['t_s']:.1f} | {m['kind']} | {m['text']} |" for m in r["marks"]]
    out += ["", "## Scenario", "", "```json", json.dumps(r["scenario"], indent=2, default=str),
            "```", ""]  # fmt: skip
    return "\n".join(out)

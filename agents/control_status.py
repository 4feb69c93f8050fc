"""`edgeloop control status`: the control plane's state per cohort, read from its topics.

Per cohort: tau, threshold version and audit rate (the newest COHORT ThresholdUpdate on
the compacted `control.thresholds.v1`), offloads/s of the last closed window against the
effective cloud budget the controller used, confidence PSI (the newest COHORT
StreamSignal), and the release stage (the newest ModelRelease of the cohort). Fleet-wide:
hard examples no training trigger has covered yet (`hard_examples_uncovered` of the newest
FLEET StreamSignal, which the control step writes from its trigger state), the cloud
capacity in force and where it came from (`capacity_per_s` of that signal; `override` when
`capacity_override_per_s` is there: `edgeloop control capacity`; `measured` with a
`teacher_capacity_per_s`; else the workers' `settings`) and the last trigger of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgeloop.agents.codec import SchemaBook
from edgeloop.schemas.bounded import DecodeLimits
from edgeloop.schemas.registry.client import RegistryClient
from edgeloop.schemas.topic_reader import read_topic

THRESHOLDS, SIGNALS = "control.thresholds.v1", "ml.signals.v1"
TRIGGERS, RELEASES = "ml.training-triggers.v1", "ml.model-releases.v1"


@dataclass
class CohortStatus:
    """One cohort's row."""

    tau: float | None = None
    version: int | None = None
    audit_rate: float | None = None
    offloads_per_s: float | None = None
    budget_per_s: float | None = None
    psi: float | None = None
    release: str = "-"


@dataclass
class ControlStatus:
    """The whole view."""

    cohorts: dict[str, CohortStatus] = field(default_factory=dict)
    hard_since_trigger: int = 0
    last_trigger: str = "-"
    capacity_per_s: float | None = None
    capacity_source: str = "-"  # override | measured | settings
    undecodable: int = 0  # records skipped: they do not decode (foreign bytes)
    incomplete: list[str] = field(default_factory=list)  # topics not read to their end


@dataclass(frozen=True)
class ControlTopics:
    """Where `read_status` reads (the defaults are the deployment's topics)."""

    thresholds: str = THRESHOLDS
    signals: str = SIGNALS
    releases: str = RELEASES
    triggers: str = TRIGGERS


async def read_status(
    bootstrap: str,
    registry_url: str,
    model_name: str,
    signal_tail: int = 2000,
    *,
    topics: ControlTopics = ControlTopics(),  # frozen: one shared default
    timeout_s: float = 60.0,
) -> ControlStatus:
    """Read the control plane's topics into a `ControlStatus`.

    Each topic is read to its end with `edgeloop.schemas.topic_reader.read_topic`: records
    that do not decode (other producers' bytes on a shared topic) are skipped and counted
    in `undecodable`; a topic not read to its end within `timeout_s` is named in
    `incomplete` (the view then shows what was read, and `render` says so); a topic that
    does not exist yet reads as empty.

    Args:
        bootstrap: the Kafka bootstrap servers.
        registry_url: the schema registry.
        model_name: the model whose last trigger is shown (the trainer's model).
        signal_tail: StreamSignals read per partition from the end.
        topics: the topics to read.
        timeout_s: the longest the read of one topic may take.

    Returns:
        The view.

    Raises:
        RegistryUnavailableError / retriable RegistryError: the registry cannot be reached.
        KafkaError: the broker is unreachable.
    """
    view = ControlStatus()
    async with RegistryClient(registry_url) as registry:
        book = SchemaBook(registry, DecodeLimits())

        async def read(topic: str, tail: int | None = None) -> list[dict[str, Any]]:
            got = await read_topic(bootstrap, topic, book.read, tail=tail, timeout_s=timeout_s)
            view.undecodable += got.undecodable
            if not got.complete:
                view.incomplete.append(topic)
            return got.records

        def row(cohort: str) -> CohortStatus:
            return view.cohorts.setdefault(cohort, CohortStatus())

        for u in await read(topics.thresholds):
            if u["scope"] == "COHORT" and u["threshold_version"] >= (
                row(u["scope_id"]).version or 0
            ):
                r = row(u["scope_id"])
                r.tau, r.version, r.audit_rate = u["tau"], u["threshold_version"], u["audit_rate"]
                r.budget_per_s = u["signals"].get("effective_capacity_per_s")
        newest: dict[str, int] = {}
        for s in await read(topics.signals, signal_tail):
            if s["scope"] == "FLEET" and s["window_end"] >= newest.get("", 0):
                newest[""] = s["window_end"]
                view.hard_since_trigger = int(s["values"].get("hard_examples_uncovered", 0))
                view.capacity_per_s, view.capacity_source = _capacity(s["values"])
            if s["scope"] != "COHORT" or s["window_end"] < newest.get(s["scope_id"], 0):
                continue
            newest[s["scope_id"]] = s["window_end"]
            r = row(s["scope_id"])
            r.offloads_per_s = s["values"].get("offloads_per_s")
            r.psi = s["values"].get("confidence_psi")
        for rel in await read(topics.releases):
            row(
                rel["cohort"]
            ).release = f"{rel['model_name']} v{rel['model_version']} {rel['stage']}"
        for t in await read(topics.triggers):
            if t["model_name"] == model_name:
                view.last_trigger = f"{t['reason']} {t['trigger_id']}"
    return view


def _capacity(values: dict[str, float]) -> tuple[float | None, str]:
    """The capacity a FLEET window was decided with, and its source."""
    if "capacity_per_s" not in values:
        return None, "-"  # a worker from before the capacity was recorded
    if "capacity_override_per_s" in values:
        return values["capacity_override_per_s"], "override"
    source = "measured" if "teacher_capacity_per_s" in values else "settings"
    return values["capacity_per_s"], source


def render(view: ControlStatus) -> str:
    """The view as a table (one line per cohort, then the fleet-wide line)."""

    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    lines = ["cohort\ttau\tversion\taudit\toffloads/s\tbudget/s\tpsi\trelease"]
    for cohort in sorted(view.cohorts):
        r = view.cohorts[cohort]
        lines.append(
            f"{cohort}\t{f(r.tau, '.2f')}\t{r.version if r.version is not None else '-'}\t"
            f"{f(r.audit_rate, '.3f')}\t{f(r.offloads_per_s, '.2f')}\t"
            f"{f(r.budget_per_s, '.2f')}\t{f(r.psi, '.3f')}\t{r.release}"
        )
    lines.append(
        f"cloud capacity: {f(view.capacity_per_s, '.2f')} offloads/s ({view.capacity_source})"
    )
    lines.append(
        f"hard examples since the last trigger: {view.hard_since_trigger} "
        f"(last trigger: {view.last_trigger})"
    )
    if view.undecodable:
        lines.append(f"skipped {view.undecodable} records that do not decode")
    if view.incomplete:
        lines.append(
            "warning: incomplete: not read to the end in time: " + ", ".join(view.incomplete)
        )
    return "\n".join(lines)

"""Scrape every child's `/metrics` and derive what the demo shows: one `Frame` per poll.

What each figure is made of (the services' own metrics; nothing here reads Kafka):

- accuracy per cohort: `edgeloop_edge_predictions_total{cohort, model_version, correct}`,
  counted by the simulator against each frame's true label; rolling over `window_s`
  (counter deltas), overall and per model version.
- offload / audit rate per cohort: `edgeloop_edge_decisions_total{cohort, decision}`
  deltas (what devices decided, before any budget is spent on the cloud side).
- budget: `edgeloop_control_budget_per_s`, the controller's effective cloud capacity in
  offloads/s. It is fleet-wide (the controller exports no per-cohort share), so every
  cohort shows the fleet budget and the dashboard compares it with the fleet's offloads.
- tau and its version: `edgeloop_control_tau{cohort}`, `..._threshold_version{cohort}`.
- hard examples: `edgeloop_control_hard_examples_since_trigger` (fleet-wide: not yet
  covered by a trigger); the cumulative count produced is `edgeloop_agents_events_out_total`
  on `ml.hard-examples.v1`.
- model versions: `edgeloop_edge_applied_version{device, cohort, kind="model"}`, devices
  per version.
- release stage: `edgeloop_control_release_version{cohort, stage}` (the judge's steps) and
  `edgeloop_trainer_release_version{cohort, stage}` (the trainer's CANARY / REFUSED). The
  gauges keep one value per stage, so the newest step is the one whose gauge changed
  since the previous poll.
- events/s per stage: device = `edgeloop_edge_published_total` (broker acknowledged),
  bridge = `edgeloop_bridge_uplink_produced_total` (Kafka acknowledged), enriched /
  verdicts / hard_examples = `edgeloop_agents_events_out_total{topic}`.
- p99 latency over the window, from histogram bucket deltas: `device_to_broker` =
  `edgeloop_edge_publish_latency_seconds` (event created -> broker PUBACK, outbox wait
  included), `bridge_to_kafka` = `edgeloop_bridge_uplink_added_latency_seconds` (MQTT
  receive -> Kafka ack), `device_to_kafka` = the sum of those two p99s (no histogram spans
  both processes; the sum bounds the p99 of the sum when the stages are comonotone, and
  leaves out the broker's hop to the bridge), `offload_to_verdict` =
  `edgeloop_edge_verdict_latency_seconds` (measured on the device: offload stored ->
  verdict back), `teacher` = `edgeloop_agents_teacher_latency_seconds`.
- the control plane's gauges are set only by the agents worker that holds the control log
  (the others export the unlabelled ones at 0, and a worker that held it before a
  failover keeps its last values): they are read from the one target with the highest
  threshold versions, never summed over workers.
- training: `edgeloop_trainer_training_in_progress`, `..._training_epoch`,
  `..._training_epochs` and `..._training_trigger{trigger_id}`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from edgeloop.core.logs import get_logger
from edgeloop.demo import scrape
from edgeloop.demo.scrape import Samples

log = get_logger(__name__)

SCRAPE_TIMEOUT_S = 2.0
ENRICHED, VERDICTS, HARD = "edge.inference.enriched.v1", "cloud.verdicts.v1", "ml.hard-examples.v1"
STAGES = ("device", "bridge", "enriched", "verdicts", "hard_examples")
HISTOGRAMS = {
    "device_to_broker": "edgeloop_edge_publish_latency_seconds",
    "bridge_to_kafka": "edgeloop_bridge_uplink_added_latency_seconds",
    "offload_to_verdict": "edgeloop_edge_verdict_latency_seconds",
    "teacher": "edgeloop_agents_teacher_latency_seconds",
}
# Not shown and the largest by far on a simulated fleet (device x stage x bucket); left
# out before parsing (see scrape.drop_families), so `value()` never sees them.
SKIPPED_FAMILIES = ("edgeloop_edge_decision_latency_seconds",)
RELEASE_GAUGES = ("edgeloop_control_release_version", "edgeloop_trainer_release_version")
# Between two steps seen in the same poll, the later stage of a rollout wins.
STAGE_RANK = {"REFUSED": 0, "CANARY": 1, "WAVE": 2, "FULL": 3, "ROLLBACK": 4}


@dataclass(frozen=True)
class Target:
    """One child's metrics endpoint."""

    service: str  # "bridge", "agents-1", "trainer", "fleet", ...
    url: str  # "http://127.0.0.1:PORT/metrics"


@dataclass(frozen=True)
class Mark:
    """Something the scenario did, placed on the observer's time axis."""

    t_s: float  # seconds since the observer started
    kind: str  # "phase" | "release" | "rollback" | "note"
    text: str


@dataclass
class CohortView:
    """One cohort in one frame."""

    cohort: str
    accuracy: float | None  # correct/total over the last `window_s` (counter deltas)
    accuracy_by_version: dict[int, float]  # same window, per model version
    frames: int  # cumulative predictions with a label
    offload_rate_per_s: float | None  # device-side offloads/s (counter delta)
    audit_rate_per_s: float | None
    budget_per_s: float | None  # the fleet budget (no per-cohort share is exported)
    tau: float | None
    tau_version: int | None
    hard_examples: int | None  # fleet-wide, not yet covered by a trigger
    model_versions: dict[int, int]  # version -> devices serving it
    release_stage: str | None  # newest judge/release step for the cohort ("CANARY v2")
    offloads: int = 0  # cumulative OFFLOAD decisions
    audits: int = 0  # cumulative AUDIT decisions
    correct: int = 0  # cumulative correct predictions (of `frames`)


@dataclass
class Frame:
    """Everything derived from one poll."""

    t_s: float
    phase: str
    cohorts: dict[str, CohortView]
    events_per_s: dict[str, float]  # per stage, see STAGES
    latency_p99_ms: dict[str, float]  # see HISTOGRAMS and the module docstring
    training: str | None  # "training trigger 3f2a… epoch 3/5", or None
    up: dict[str, bool]  # target service -> last scrape succeeded
    uplink_bytes: float | None = None  # cumulative offloaded input bytes, whole fleet
    hard_examples_total: float | None = None  # cumulative hard examples routed
    budget_per_s: float | None = None  # the controller's effective cloud budget


@dataclass
class _Snapshot:
    t: float
    counters: dict[tuple[str, ...], float] = field(default_factory=dict)
    hists: dict[str, dict[float, float]] = field(default_factory=dict)


class Observer:
    """Polls the targets, keeps the frames and the scenario's marks.

    Args:
        targets: the endpoints to scrape (more with `add_target`).
        cohorts: the cohorts to show (cohorts seen in the metrics are added after them).
        window_s: the window of rolling figures (accuracy, rates, p99s).
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        targets: Sequence[Target],
        cohorts: Sequence[str],
        *,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.targets: list[Target] = list(targets)
        self.cohorts = list(cohorts)
        self.window_s = window_s
        self._clock = clock
        self._t0 = clock()
        self.frames: list[Frame] = []
        self.marks: list[Mark] = []
        self._latest: dict[str, Samples] = {}  # per service: its newest good scrape
        self._merged: Samples = {}
        self._up: dict[str, bool] = {}
        # Bounded: entries older than one window before the newest are dropped.
        self._history: deque[_Snapshot] = deque()
        self._release_seen: dict[tuple[str, str, str], float] = {}
        self._release_stage: dict[str, str] = {}
        self._ctl: Samples = {}  # the control-log holder's newest samples

    def now_s(self) -> float:
        """Seconds since the observer started (the frames' and marks' time axis)."""
        return self._clock() - self._t0

    def add_target(self, target: Target) -> None:
        """Scrape `target` too from the next poll on."""
        self.targets.append(target)

    def mark(self, kind: str, text: str) -> Mark:
        """Record a scenario event ("phase", "release", "rollback", "note") at now."""
        m = Mark(self.now_s(), kind, text)
        self.marks.append(m)
        return m

    async def poll(self, phase: str) -> Frame:
        """Scrape every target concurrently, derive a frame and append it.

        A target that does not answer within 2 s, answers non-200 or serves text that does
        not parse is marked down (`Frame.up`) and its previous samples are kept, so its
        counters do not look reset; nothing is raised.

        Args:
            phase: the scenario's current phase, stored in the frame.

        Returns:
            The new frame.
        """
        targets = list(self.targets)
        async with httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S) as client, asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self._scrape(client, t)) for t in targets]
        for target, task in zip(targets, tasks, strict=True):
            samples = task.result()
            self._up[target.service] = samples is not None
            if samples is not None:
                self._latest[target.service] = samples
        self._merged = scrape.merge(self._latest.values())
        frame = self._derive(phase)
        self.frames.append(frame)
        return frame

    async def _scrape(self, client: httpx.AsyncClient, target: Target) -> Samples | None:
        try:
            resp = await client.get(target.url)
            resp.raise_for_status()
            # Off the loop: parsing a fleet's exposition takes tens of milliseconds or more.
            return await asyncio.to_thread(scrape.parse, resp.text, skip=SKIPPED_FAMILIES)
        except (httpx.HTTPError, ValueError, OSError) as exc:
            log.debug("scrape failed", extra={"service": target.service, "error": str(exc)})
            return None

    def value(self, metric: str, **labels: str) -> float | None:
        """Sum of the newest scrape's samples of `metric` (a sample name, e.g.
        `edgeloop_edge_decisions_total`) whose labels include `labels`, over every target;
        None when there is no such sample (or it is one of `SKIPPED_FAMILIES`)."""
        return scrape.total(self._merged, metric, **labels)

    def histogram(self, metric: str) -> dict[float, float]:
        """The newest scrape's cumulative buckets of histogram `metric` (a family name,
        e.g. `edgeloop_edge_publish_latency_seconds`), summed over every label set and
        target: upper bound (s) -> observations at or below it, since each process began."""
        return scrape.buckets(self._merged, metric)

    def series(self, cohort: str, field: str) -> list[tuple[float, float]]:
        """(t_s, value) of one numeric `CohortView` field over the frames; None skipped."""
        out: list[tuple[float, float]] = []
        for f in self.frames:
            view = f.cohorts.get(cohort)
            v = getattr(view, field, None) if view is not None else None
            if isinstance(v, int | float):
                out.append((f.t_s, float(v)))
        return out

    # -- derivation ---------------------------------------------------------------------

    def _snapshot(self, t: float) -> _Snapshot:
        s = self._merged
        snap = _Snapshot(t)
        c = snap.counters
        pred = scrape.grouped(
            s, "edgeloop_edge_predictions_total", ("cohort", "model_version", "correct")
        )
        for key, v in pred.items():
            c[("pred", *(val for _, val in key))] = v
        for key, v in scrape.grouped(
            s, "edgeloop_edge_decisions_total", ("cohort", "decision")
        ).items():
            c[("dec", *(val for _, val in key))] = v
        stages = {
            "device": scrape.total(s, "edgeloop_edge_published_total"),
            "bridge": scrape.total(s, "edgeloop_bridge_uplink_produced_total"),
            "enriched": scrape.total(s, "edgeloop_agents_events_out_total", topic=ENRICHED),
            "verdicts": scrape.total(s, "edgeloop_agents_events_out_total", topic=VERDICTS),
            "hard_examples": scrape.total(s, "edgeloop_agents_events_out_total", topic=HARD),
        }
        for stage, n in stages.items():
            if n is not None:
                c[("stage", stage)] = n
        for hist, name in HISTOGRAMS.items():
            b = scrape.buckets(s, name)
            if b:
                snap.hists[hist] = b
        return snap

    def _baseline(self, snap: _Snapshot) -> _Snapshot | None:
        self._history.append(snap)
        while len(self._history) >= 2 and self._history[1].t <= snap.t - self.window_s:
            self._history.popleft()
        base = self._history[0]
        return None if base is snap or base.t >= snap.t else base

    def _derive(self, phase: str) -> Frame:
        t = self.now_s()
        snap = self._snapshot(t)
        base = self._baseline(snap)
        elapsed = snap.t - base.t if base is not None else 0.0

        def delta(key: tuple[str, ...]) -> float:
            cur = snap.counters.get(key, 0.0)
            return scrape.increase(cur, base.counters.get(key) if base else None)

        def rate(key: tuple[str, ...]) -> float | None:
            return delta(key) / elapsed if base is not None and elapsed > 0 else None

        seen = {k[1] for k in snap.counters if k[0] in ("pred", "dec")}
        cohorts = self.cohorts + sorted(seen - set(self.cohorts))
        self._ctl = self._control_holder()
        self._update_releases()
        budget = scrape.total(self._ctl, "edgeloop_control_budget_per_s")
        hard_now = scrape.total(self._ctl, "edgeloop_control_hard_examples_since_trigger")
        views = {
            c: self._cohort(
                c, snap=snap, base=base, delta=delta, rate=rate, budget=budget, hard_now=hard_now
            )
            for c in cohorts
        }
        events = {st: r for st in STAGES if (r := rate(("stage", st))) is not None}
        return Frame(
            t_s=t,
            phase=phase,
            cohorts=views,
            events_per_s=events,
            latency_p99_ms=self._p99s(snap, base),
            training=self._training(),
            up={tg.service: self._up.get(tg.service, False) for tg in self.targets},
            uplink_bytes=self.value("edgeloop_edge_offload_bytes_total"),
            hard_examples_total=snap.counters.get(("stage", "hard_examples")),
            budget_per_s=budget,
        )

    def _cohort(
        self,
        cohort: str,
        *,
        snap: _Snapshot,
        base: _Snapshot | None,
        delta: Callable[[tuple[str, ...]], float],
        rate: Callable[[tuple[str, ...]], float | None],
        budget: float | None,
        hard_now: float | None,
    ) -> CohortView:
        versions = sorted({int(k[2]) for k in snap.counters if k[0] == "pred" and k[1] == cohort})
        right = wrong = 0.0
        by_version: dict[int, float] = {}
        for v in versions:
            r = delta(("pred", cohort, str(v), "true")) if base else 0.0
            w = delta(("pred", cohort, str(v), "false")) if base else 0.0
            right, wrong = right + r, wrong + w
            if r + w > 0:
                by_version[v] = r / (r + w)
        frames = sum(val for k, val in snap.counters.items() if k[0] == "pred" and k[1] == cohort)
        correct = sum(
            val
            for k, val in snap.counters.items()
            if k[0] == "pred" and k[1] == cohort and k[3] == "true"
        )
        served: dict[int, int] = {}
        for lab, val in self._merged.get("edgeloop_edge_applied_version", ()):
            if lab.get("cohort") == cohort and lab.get("kind") == "model" and val > 0:
                served[int(val)] = served.get(int(val), 0) + 1
        tau_version = scrape.total(self._ctl, "edgeloop_control_threshold_version", cohort=cohort)
        return CohortView(
            cohort=cohort,
            accuracy=right / (right + wrong) if right + wrong > 0 else None,
            accuracy_by_version=by_version,
            frames=int(frames),
            offload_rate_per_s=rate(("dec", cohort, "OFFLOAD")),
            audit_rate_per_s=rate(("dec", cohort, "AUDIT")),
            budget_per_s=budget,
            tau=scrape.total(self._ctl, "edgeloop_control_tau", cohort=cohort),
            tau_version=int(tau_version) if tau_version is not None else None,
            hard_examples=int(hard_now) if hard_now is not None else None,
            model_versions=dict(sorted(served.items())),
            release_stage=self._release_stage.get(cohort),
            offloads=int(snap.counters.get(("dec", cohort, "OFFLOAD"), 0.0)),
            audits=int(snap.counters.get(("dec", cohort, "AUDIT"), 0.0)),
            correct=int(correct),
        )

    def _control_holder(self) -> Samples:
        """The samples of the target whose controller is furthest along (the highest sum
        of threshold versions): the worker holding the control log."""
        with_control = [
            (v, samples)
            for samples in self._latest.values()
            if (v := scrape.total(samples, "edgeloop_control_threshold_version")) is not None
            or "edgeloop_control_budget_per_s" in samples
        ]
        if not with_control:
            return {}
        return max(with_control, key=lambda pair: pair[0] or 0.0)[1]

    def _update_releases(self) -> None:
        changed: dict[str, tuple[float, int, str]] = {}
        for name in RELEASE_GAUGES:
            source = self._ctl if name.startswith("edgeloop_control_") else self._merged
            for lab, val in source.get(name, ()):
                key = (name, lab.get("cohort", ""), lab.get("stage", ""))
                if self._release_seen.get(key) == val:
                    continue
                self._release_seen[key] = val
                cohort, stage = key[1], key[2]
                cand = (val, STAGE_RANK.get(stage, 0), stage)
                if cohort not in changed or cand[:2] > changed[cohort][:2]:
                    changed[cohort] = cand
        for cohort, (version, _, stage) in changed.items():
            self._release_stage[cohort] = f"{stage} v{int(version)}"

    def _p99s(self, snap: _Snapshot, base: _Snapshot | None) -> dict[str, float]:
        out: dict[str, float] = {}
        if base is None:
            return out
        for key, cur in snap.hists.items():
            q = scrape.quantile(0.99, scrape.bucket_increase(cur, base.hists.get(key, {})))
            if q is not None:
                out[key] = q * 1000.0
        if "device_to_broker" in out and "bridge_to_kafka" in out:
            out["device_to_kafka"] = out["device_to_broker"] + out["bridge_to_kafka"]
        return out

    def _training(self) -> str | None:
        if not self.value("edgeloop_trainer_training_in_progress"):
            return None
        trigger = next(
            (
                lab.get("trigger_id", "")
                for lab, v in self._merged.get("edgeloop_trainer_training_trigger", ())
                if v > 0
            ),
            "",
        )
        text = f"training trigger {trigger[:8]}…" if trigger else "training"
        epoch = self.value("edgeloop_trainer_training_epoch")
        epochs = self.value("edgeloop_trainer_training_epochs")
        if epoch is not None and epochs:
            text += f" epoch {int(epoch)}/{int(epochs)}"
            if epoch >= epochs:
                text += " (export, quantize, gate)"
        return text

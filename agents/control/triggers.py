"""Training triggers (`ml.training-triggers.v1`): count, drift, schedule and manual.

One `TriggerState` per model (a Faust table keyed by model name, fed by a stream keyed by
model name, so its input order is a log's order and replays identically). It tracks, per
partition of the hard-example topic, the first offset no trigger has covered yet and the
end of what it has seen, so a trigger names exact half-open ranges [start, end) that
`edgeloop train serve` reads (trainer/hard_example_source.py) and no offset is covered
twice. A redelivered hard example (offset below what was seen) is ignored.

Conditions (all in event time):
  COUNT     `hard_examples` uncovered hard examples of the serving model version.
  DRIFT     a cohort's confidence PSI > `psi_bound` in `drift_windows` consecutive
            windows; fires once per episode (re-armed when PSI falls back).
  SCHEDULE  once per slot of `schedule_s`, aligned to the epoch.
  MANUAL    `edgeloop train trigger`: bypasses the debounce; its id comes from the
            request id, so a repeated request is the same trigger. A request is dropped
            (`manual_drop_reason`; the worker logs and counts it) when fewer than
            `min_examples` hard examples are uncovered, or when its id is one of the
            last `MANUAL_MEMORY` (256) ids that fired: an id older than those fires again.
Debounce: two automatic triggers of a model are at least `debounce_s` apart; a condition
met meanwhile is pending and fires when the debounce ends (on the next input or tick).
A condition met while fewer than `min_examples` are uncovered also waits (the trainer
rejects empty ranges).

trigger_id = "<reason>-" + the first 32 hex digits of sha256 over (model, base version,
reason, ranges, and the slot or request id): the same condition over the same offsets
yields the same id after a crash or rebalance, and the trainer's ledger runs it once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeloop.agents.control.settings import TriggerSettings
from edgeloop.agents.ids import derived_id

US = 1_000_000
# Manual request ids that fired, remembered (newest kept) so a repeated or redelivered
# request is not re-run; the memory lives in the control state, so it is bounded.
MANUAL_MEMORY = 256
# Why a manual request fired nothing (`edgeloop_control_trigger_requests_dropped_total`).
DROP_ALREADY_HANDLED = "already_handled"
DROP_TOO_FEW_EXAMPLES = "too_few_examples"


@dataclass(frozen=True, slots=True)
class HardObs:
    """Where one HardExample record sits in the log, and which model version made it."""

    partition: int
    offset: int
    model_version: int
    ts_us: int


@dataclass(slots=True)
class PartitionProgress:
    """Uncovered offsets of one partition: [covered, seen), holding `count` records."""

    covered: int
    seen: int
    count: int = 0


@dataclass(slots=True)
class DriftStreak:
    """Consecutive windows of one cohort with PSI above the bound."""

    streak: int = 0
    last_end_us: int = 0
    fired: bool = False


@dataclass(slots=True)
class TriggerState:
    """One model's trigger state (the changelog value)."""

    model_name: str
    serving_version: int
    partitions: dict[str, PartitionProgress] = field(default_factory=dict)
    count_for_version: int = 0
    last_fired_us: int | None = None
    pending_reason: str | None = None
    pending_detail: str = ""
    drift: dict[str, DriftStreak] = field(default_factory=dict)
    schedule_slot: int | None = None
    manual_seen: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TriggerState:
        """Inverse of `to_json`."""
        d = dict(data)
        d["partitions"] = {k: PartitionProgress(**v) for k, v in d["partitions"].items()}
        d["drift"] = {k: DriftStreak(**v) for k, v in d["drift"].items()}
        d["manual_seen"] = list(d["manual_seen"])
        return cls(**d)

    @property
    def uncovered(self) -> int:
        return sum(p.count for p in self.partitions.values())


def set_serving_version(state: TriggerState, version: int) -> None:
    """A new model version serves the fleet (its release went FULL): counting and drift
    episodes start over for it."""
    if version != state.serving_version:
        state.serving_version = version
        state.count_for_version = 0
        state.drift.clear()


def on_hard(obs: HardObs, state: TriggerState, settings: TriggerSettings) -> list[dict[str, Any]]:
    """Account one hard example; fire COUNT (or a pending condition) when due.

    Returns:
        The TrainingTrigger records (Avro-shaped dicts) fired, at most one.
    """
    key = str(obs.partition)
    p = state.partitions.get(key)
    if p is None:
        # The first record seen on a partition opens its range; earlier offsets belong to
        # before this trigger state existed (or to triggers already fired).
        p = state.partitions[key] = PartitionProgress(obs.offset, obs.offset)
    if obs.offset < p.seen:
        return []  # redelivered: already counted
    p.seen, p.count = obs.offset + 1, p.count + 1
    if obs.model_version == state.serving_version:
        state.count_for_version += 1
    if state.count_for_version >= settings.hard_examples and state.pending_reason is None:
        detail = (
            f"{state.count_for_version} hard examples of {state.model_name} "
            f"v{state.serving_version} (threshold {settings.hard_examples})"
        )
        return _fire("COUNT", detail, obs.ts_us, state, settings)
    return _pending(obs.ts_us, state, settings)


def on_signal(
    signal: Mapping[str, Any], state: TriggerState, settings: TriggerSettings
) -> list[dict[str, Any]]:
    """Account one COHORT (or FLEET) StreamSignal's PSI; fire DRIFT when sustained.

    Windows of another model version than the serving one are ignored.
    """
    values = signal["values"]
    psi = values.get("confidence_psi")
    version = values.get("psi_model_version")
    end = int(signal["window_end"])
    if psi is None or (version is not None and int(version) != state.serving_version):
        return _pending(end, state, settings)
    scope_id = str(signal["scope_id"])
    d = state.drift.setdefault(scope_id, DriftStreak())
    if psi > settings.psi_bound:
        d.streak = d.streak + 1 if d.last_end_us == int(signal["window_start"]) else 1
    else:
        d.streak, d.fired = 0, False
    d.last_end_us = end
    if d.streak >= settings.drift_windows and not d.fired:
        d.fired = True
        detail = (
            f"{signal['scope']} {scope_id}: confidence PSI {psi:.3f} > {settings.psi_bound} "
            f"for {d.streak} windows (model v{state.serving_version})"
        )
        if state.pending_reason is None:
            return _fire("DRIFT", detail, end, state, settings)
    return _pending(end, state, settings)


def on_tick(now_us: int, state: TriggerState, settings: TriggerSettings) -> list[dict[str, Any]]:
    """Time passed: fire the schedule's slot, or a pending condition whose debounce ended."""
    if settings.schedule_s > 0:
        slot = now_us // round(settings.schedule_s * US)
        if state.schedule_slot is None:
            state.schedule_slot = slot  # the first tick starts the schedule
        elif slot > state.schedule_slot:
            state.schedule_slot = slot
            if state.pending_reason is None:
                detail = f"schedule slot {slot} of {settings.schedule_s:g} s"
                return _fire("SCHEDULE", detail, now_us, state, settings, key=str(slot))
    return _pending(now_us, state, settings)


def manual_drop_reason(
    request_id: str, state: TriggerState | None, settings: TriggerSettings
) -> str | None:
    """Why a manual request would fire nothing, or None when it fires.

    Args:
        request_id: the request's id.
        state: the model's trigger state; None before any hard example was seen.
        settings: `min_examples`.

    Returns:
        DROP_ALREADY_HANDLED: the id is among the last MANUAL_MEMORY that fired;
        DROP_TOO_FEW_EXAMPLES: fewer than `min_examples` hard examples are uncovered (the
        trainer rejects empty ranges); None otherwise.
    """
    if state is not None and request_id in state.manual_seen:
        return DROP_ALREADY_HANDLED
    if state is None or state.uncovered < settings.min_examples:
        return DROP_TOO_FEW_EXAMPLES
    return None


def manual(
    request_id: str, now_us: int, state: TriggerState, settings: TriggerSettings, detail: str = ""
) -> list[dict[str, Any]]:
    """A person asked for a retrain (`edgeloop train trigger`): fire now, no debounce.

    Returns:
        The trigger; none when `manual_drop_reason` names a reason.
    """
    if manual_drop_reason(request_id, state, settings) is not None:
        return []
    state.manual_seen = [*state.manual_seen, request_id][-MANUAL_MEMORY:]
    text = f"manual request {request_id}" + (f": {detail}" if detail else "")
    return _fire("MANUAL", text, now_us, state, settings, key=request_id, force=True)


def _pending(now_us: int, state: TriggerState, settings: TriggerSettings) -> list[dict[str, Any]]:
    if state.pending_reason is None:
        return []
    return _fire(state.pending_reason, state.pending_detail, now_us, state, settings)


def _fire(
    reason: str,
    detail: str,
    now_us: int,
    state: TriggerState,
    settings: TriggerSettings,
    *,
    key: str = "",
    force: bool = False,
) -> list[dict[str, Any]]:
    debounced = (
        state.last_fired_us is not None and now_us - state.last_fired_us < settings.debounce_s * US
    )
    if not force and (debounced or state.uncovered < settings.min_examples):
        if state.pending_reason is None:
            state.pending_reason, state.pending_detail = reason, detail
        return []
    ranges = [
        {
            "topic": settings.hard_example_topic,
            "partition": int(part),
            "start_offset": p.covered,
            "end_offset": p.seen,
        }
        for part, p in sorted(state.partitions.items(), key=lambda kv: int(kv[0]))
        if p.seen > p.covered
    ]
    count = state.uncovered
    ident = json.dumps(
        [state.model_name, state.serving_version, reason, key, ranges], separators=(",", ":")
    )
    trigger_id = f"{reason.lower()}-{hashlib.sha256(ident.encode()).hexdigest()[:32]}"
    for p in state.partitions.values():
        p.covered, p.count = p.seen, 0
    state.count_for_version = 0
    state.pending_reason, state.pending_detail = None, ""
    if not force:
        state.last_fired_us = now_us
    return [
        {
            "event_id": derived_id("trigger", trigger_id),
            "ts": now_us,
            "trigger_id": trigger_id,
            "model_name": state.model_name,
            "base_model_version": state.serving_version,
            "reason": reason,
            "ranges": ranges,
            "hard_example_count": count,
            "detail": detail,
        }
    ]

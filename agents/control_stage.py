"""The control plane's step glue: records -> control log -> signals, thresholds, triggers.

Two steps, both pure (no Faust, no Kafka, no clock):

`observation(schema_name, rec, raw)` reduces one decoded source record (InferenceEvent,
OffloadRequest, CloudVerdict, DeviceStatus, HardExample, ModelRelease) to a small JSON
observation.
The worker appends these to the control log, a one-partition internal topic: COHORT and
FLEET windows need every device's events in one place, and the trigger state needs every
hard-example partition's offsets in one place. The log's order is the order the control
step sees, so replaying it yields the same outputs.

`ControlStep.apply(obs, offset, state)` advances the control state by one log record:
signal windows (agents/control/signals.py), the threshold controller once per closed
window (threshold.py), the training triggers (triggers.py), and the rollout judge
(judge.py) once per window end for each cohort's rollout. `state.offset` is the last
log offset applied: a record at or below it (a redelivery after a crash, when the table's
changelog already holds the state after it) is skipped, so no observation counts twice.
Outputs are (topic, key, Avro-shaped dict); their ids and versions derive from the windows
and offsets only (see the modules above), so a replay produces the same records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from edgeloop.agents.control import judge, signals, threshold, triggers
from edgeloop.agents.control.settings import ControlSettings
from edgeloop.agents.records import Raw
from edgeloop.agents.teacher_rate import RateSample

SIGNALS_TOPIC = "ml.signals.v1"
THRESHOLDS_TOPIC = "control.thresholds.v1"
TRIGGERS_TOPIC = "ml.training-triggers.v1"
RELEASES_TOPIC = "ml.model-releases.v1"

INFERENCE_EVENT = "edgeloop.v1.InferenceEvent"
ENRICHED_EVENT = "edgeloop.v1.EnrichedInferenceEvent"
OFFLOAD_REQUEST = "edgeloop.v1.OffloadRequest"
CLOUD_VERDICT = "edgeloop.v1.CloudVerdict"
DEVICE_STATUS = "edgeloop.v1.DeviceStatus"
HARD_EXAMPLE = "edgeloop.v1.HardExample"
MODEL_RELEASE = "edgeloop.v1.ModelRelease"


def observation(schema_name: str, rec: Mapping[str, Any], raw: Raw) -> dict[str, Any] | None:
    """The control log's observation of one decoded source record (None: not one we use).

    Args:
        schema_name: the record's full schema name.
        rec: the decoded record.
        raw: where it came from (a HardExample's partition and offset are its identity
            for the training triggers' ranges).

    Returns:
        A JSON-able dict with kind `k`, or None.

    Raises:
        KeyError, TypeError, ValueError: a record missing what its schema promises, or a
            number that is not finite or out of range (a confidence outside [0, 1]); the
            caller counts it and leaves it out.
    """
    obs = _observation(schema_name, rec, raw)
    if obs is not None:
        _check_numbers(obs)
    return obs


# The largest rate, latency or byte count an observation may carry: far above any real
# one, and small enough that the window histograms' bucket arithmetic cannot overflow.
_MAX_MEASURE = 1e12


def _check_numbers(obs: Mapping[str, Any]) -> None:
    """Refuse a non-finite or out-of-range number (one NaN confidence from a device stored
    in a canary's sample stopped every judge step after it; a confidence of 1e308 raised
    OverflowError in the bucket arithmetic and lost the control batch's outputs)."""
    for name, value in obs.items():
        if name == "confidence":  # also null: orjson writes a NaN as null
            ok = isinstance(value, (int, float)) and 0.0 <= value <= 1.0
        elif not isinstance(value, float):
            continue
        else:  # false for NaN and for either infinity too (per event: no isfinite call)
            ok = -_MAX_MEASURE <= value <= _MAX_MEASURE
        if not ok:
            raise ValueError(f"observation {obs.get('k')!r}: {name} = {value!r} is out of range")


def _observation(schema_name: str, rec: Mapping[str, Any], raw: Raw) -> dict[str, Any] | None:
    if schema_name in (INFERENCE_EVENT, ENRICHED_EVENT):
        return {"k": "inf", "event_id": str(rec["event_id"]), **signals.inference_fields(rec)}
    if schema_name == OFFLOAD_REQUEST:
        return {
            "k": "req",
            "id": str(rec["event_id"]),
            "cohort": str(rec["cohort"]),
            "confidence": float(rec["confidence"]),
            "reason": str(rec["reason"]),
        }
    if schema_name == CLOUD_VERDICT:
        return {
            "k": "ver",
            "request": str(rec["request_event_id"]),
            "device_id": str(rec["device_id"]),
            "ts": int(rec["ts"]),
            "agree": bool(rec["agree"]),
            "latency_ms": float(rec["latency_ms"]),
            "model_version": int(rec["model_version"]),
        }
    if schema_name == DEVICE_STATUS:
        return {"k": "st", **_fields(signals.StatusObs.from_record(rec))}
    return _log_records(schema_name, rec, raw)


def _log_records(schema_name: str, rec: Mapping[str, Any], raw: Raw) -> dict[str, Any] | None:
    """Observations of the agents' own logs: releases and hard examples."""
    if schema_name == MODEL_RELEASE:
        return {"k": "rel", **{k: rec[k] for k in _RELEASE_FIELDS}}
    if schema_name == HARD_EXAMPLE:
        return {
            "k": "hard",
            "partition": raw.partition,
            "offset": raw.offset,
            "model_version": int(rec["model_version"]),
            "ts": int(rec["ts"]),
        }
    return None


# An inference observation's keys: its kind, the event id and InferenceObs's fields
# (the first workers wrote no event id: their records are read as before).
_INF_KEYS = frozenset(("k", "event_id", *signals.InferenceObs.__slots__))
_INF_KEYS_NO_ID = _INF_KEYS - {"event_id"}

_RELEASE_FIELDS = ("model_name", "model_version", "cohort", "stage", "wave", "artifact_url",
                   "manifest_sha256", "target", "parent_version")  # fmt: skip


def _fields(obs: signals.InferenceObs | signals.StatusObs) -> dict[str, Any]:
    return {name: getattr(obs, name) for name in obs.__slots__}


def tick(
    now_us: int,
    lag_s: float | None = None,
    *,
    behind: int | None = None,
    worker: str | None = None,
    teacher: RateSample | None = None,
) -> dict[str, Any]:
    """A clock tick for the control log (closes windows of an idle stream).

    Args:
        now_us: the worker's clock.
        lag_s: the offload backlog in seconds, as older workers wrote it (None: unknown).
        behind: the offload backlog in messages, as the worker measured it; the control
            step turns it into seconds at the capacity in force when it applies the tick,
            so a runtime capacity change (`edgeloop control capacity`) counts there too.
        worker: the worker's id (host:pid), naming its `teacher` measurement.
        teacher: the worker's verdict stage rates (offloads per busy second and per
            second) and busy share over the last span (`agents.teacher_rate`); None: no
            verdicts ran in the span.

    Returns:
        The observation.
    """
    obs: dict[str, Any] = {"k": "tick", "ts": now_us, "lag_s": lag_s}
    if behind is not None:
        obs["behind"] = behind
    if worker is not None and teacher is not None:
        obs["worker"] = worker
        obs["teacher_per_s"] = teacher.per_s
        obs["teacher_wall_per_s"] = teacher.wall_per_s
        obs["teacher_busy"] = teacher.busy
        obs["teacher_service_p99_ms"] = teacher.service_p99_s * 1000.0
    return obs


def manual(request_id: str, now_us: int, detail: str = "") -> dict[str, Any]:
    """A MANUAL training trigger request (`edgeloop train trigger`)."""
    return {"k": "manual", "id": request_id, "ts": now_us, "detail": detail}


# Below this a backlog's drain time overflows to inf (1e-320 offloads/s was accepted).
MIN_CAPACITY_PER_S = 1e-3


def capacity(per_s: float | None, now_us: int) -> dict[str, Any]:
    """An operator's cloud capacity, offloads/s the teacher sustains (`edgeloop control
    capacity`); None returns to the worker's setting. Applied from the next window end.

    Raises:
        ValueError: `per_s` is not a positive finite number.
    """
    if per_s is not None and not (math.isfinite(per_s) and per_s >= MIN_CAPACITY_PER_S):
        raise ValueError(
            f"capacity must be a positive number of offloads/s (at least "
            f"{MIN_CAPACITY_PER_S:g}), not {per_s!r}"
        )
    return {"k": "cap", "per_s": per_s, "ts": now_us}


def encode(obs: Mapping[str, Any]) -> bytes:
    """An observation as the control log carries it (compact JSON; orjson, which writes
    a non-finite float as null)."""
    return orjson.dumps(obs)


# A packed record's size bound: far below the brokers' default 1 MiB `message.max.bytes`,
# so a batch of observations never meets a RecordTooLarge.
PACK_MAX_BYTES = 256 * 1024
_PACK_HEAD = b'{"k":"many","obs":['
_PACK_TAIL = b"]}"


def pack(observations: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """A batch's observations as control-log records of kind `many`, in order.

    One record per source batch (split where one would pass `PACK_MAX_BYTES`) instead of
    one per source record: the control log then costs the worker one produced record and
    the control agent one delivered record per batch, not per event (measured with
    `edgeloop bench agents`: a record per event was about 40% of the worker's CPU).

    Args:
        observations: JSON-able observations (`observation`, `tick`, ...).

    Returns:
        The records' values (none for no observations). orjson writes a non-finite float
        as null; the control step then counts that observation as malformed.
    """
    records: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    for obs in observations:
        item = orjson.dumps(obs)
        if chunk and size + len(item) > PACK_MAX_BYTES:
            records.append(_PACK_HEAD + b",".join(chunk) + _PACK_TAIL)
            chunk, size = [], 0
        chunk.append(item)
        size += len(item) + 1
    if chunk:
        records.append(_PACK_HEAD + b",".join(chunk) + _PACK_TAIL)
    return records


def decode(value: bytes) -> dict[str, Any]:
    """Inverse of `encode` and of each of `pack`'s records.

    Raises:
        ValueError: not a JSON object with a kind `k`.
    """
    obs = orjson.loads(value)
    if not isinstance(obs, dict) or "k" not in obs:
        raise ValueError("control log record is not an observation")
    return obs


@dataclass(slots=True)
class ControlState:
    """Everything the control step keeps (one Faust table value, JSON in the changelog)."""

    offset: int = -1
    signals: signals.SignalState = field(
        default_factory=lambda: signals.SignalState(list(signals.SCOPES))
    )
    controller: threshold.ControllerState = field(default_factory=threshold.ControllerState)
    triggers: triggers.TriggerState | None = None
    # request event id -> (cohort, edge confidence, reason), insertion-ordered (oldest first)
    pending: dict[str, list[Any]] = field(default_factory=dict)
    pending_forgotten: int = 0
    hard_since_trigger: int = 0
    fired: int = 0
    # device id -> its cohort as its latest event said (one entry per device of the fleet)
    devices: dict[str, str] = field(default_factory=dict)
    # cohort -> its newest FULL release (a rollout's parent: what a ROLLBACK reinstalls)
    full: dict[str, dict[str, Any]] = field(default_factory=dict)
    # cohort -> its rollout (the newest CANARY's), JSON as judge.RolloutState.to_json
    rollouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    rollouts_unparented: int = 0  # CANARY releases whose parent's FULL release was unknown
    # The operator's cloud capacity override in force: {"per_s", "ts" (requested),
    # "offset" (its control-log record)}; None: the setting (or a measured rate).
    capacity: dict[str, Any] | None = None
    # worker id -> its newest teacher measurement {"per_s", "busy", "ts"} (from its ticks)
    teachers: dict[str, dict[str, float]] = field(default_factory=dict)
    # The fleet's teacher capacity as last measured saturated: {"per_s", "ts"}; None:
    # never saturated yet (the setting stands in).
    teacher_capacity: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (the changelog value)."""
        return {
            "offset": self.offset,
            "signals": self.signals.to_json(),
            "controller": self.controller.to_json(),
            "triggers": None if self.triggers is None else self.triggers.to_json(),
            "pending": self.pending,
            "pending_forgotten": self.pending_forgotten,
            "hard_since_trigger": self.hard_since_trigger,
            "fired": self.fired,
            "devices": self.devices,
            "full": self.full,
            "rollouts": self.rollouts,
            "rollouts_unparented": self.rollouts_unparented,
            "capacity": self.capacity,
            "teachers": self.teachers,
            "teacher_capacity": self.teacher_capacity,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ControlState:
        """Inverse of `to_json`."""
        trig = data["triggers"]
        return cls(
            offset=int(data["offset"]),
            signals=signals.SignalState.from_json(data["signals"]),
            controller=threshold.ControllerState.from_json(data["controller"]),
            triggers=None if trig is None else triggers.TriggerState.from_json(trig),
            pending=dict(data["pending"]),
            pending_forgotten=int(data["pending_forgotten"]),
            hard_since_trigger=int(data["hard_since_trigger"]),
            fired=int(data["fired"]),
            devices=dict(data["devices"]),
            full=dict(data["full"]),
            rollouts=dict(data["rollouts"]),
            rollouts_unparented=int(data["rollouts_unparented"]),
            # Absent from a changelog written before overrides existed: none.
            capacity=data.get("capacity"),
            # Absent from a changelog written before capacity was measured: none yet.
            teachers=dict(data.get("teachers") or {}),
            teacher_capacity=data.get("teacher_capacity"),
        )


Output = tuple[str, str, dict[str, Any]]  # topic, key, record


class ControlStep:
    """Applies control-log records to a `ControlState` (see the module docstring)."""

    def __init__(self, settings: ControlSettings) -> None:
        self.s = settings
        # Manual trigger requests that fired nothing, with why, since the caller last took
        # them (`take_dropped`): the worker logs and counts each (nothing else would tell
        # the operator whose `edgeloop train trigger` was answered with nothing).
        self._dropped: list[dict[str, Any]] = []
        self._handlers: dict[str, Callable[[Mapping[str, Any], ControlState], list[Output]]] = {
            "inf": self._observe,
            "st": self._observe,
            "ver": self._observe,
            "req": self._remember,
            "hard": self._hard,
            "tick": self._tick,
            "manual": self._manual,
            "rel": self._release,
            "cap": self._capacity,
        }

    def take_dropped(self) -> list[dict[str, Any]]:
        """The manual requests dropped since the last call: {"request_id", "reason"
        (triggers.DROP_*), "uncovered", "min_examples"}; the list is emptied."""
        dropped, self._dropped = self._dropped, []
        return dropped

    def apply(self, obs: Mapping[str, Any], offset: int, state: ControlState) -> list[Output]:
        """Apply one control-log record.

        Args:
            obs: the decoded observation.
            offset: its offset in the control log.
            state: updated in place.

        Returns:
            StreamSignals, ThresholdUpdates and TrainingTriggers to produce, in order;
            none for a record at or below `state.offset` (already applied).

        Raises:
            KeyError, TypeError, ValueError: a malformed observation (state untouched
                except `offset`; the caller dead-letters the record).
        """
        if offset <= state.offset:
            return []
        state.offset = offset
        return self._apply(obs, state)

    def apply_record(
        self, record: Mapping[str, Any], offset: int, state: ControlState
    ) -> tuple[list[Output], int]:
        """Apply one control-log record: one observation, or a `pack`ed batch of them.

        Args:
            record: the decoded record (`decode`).
            offset: its offset in the control log (a packed batch's observations share it:
                the batch is applied whole or, when at or below `state.offset`, skipped).
            state: updated in place.

        Returns:
            The outputs, in order, and how many of a batch's observations were malformed
            and skipped (each alone; the rest of the batch still counts).

        Raises:
            KeyError, TypeError, ValueError: a malformed single observation (as `apply`).
        """
        if record.get("k") != "many":
            return self.apply(record, offset, state), 0
        if offset <= state.offset:
            return [], 0
        state.offset = offset
        items = record["obs"]
        if not isinstance(items, list):
            raise TypeError("a packed control-log record's `obs` is not a list")
        outputs: list[Output] = []
        malformed = 0
        for obs in items:
            try:
                if not isinstance(obs, dict) or obs.get("k") == "many":
                    raise ValueError("a packed observation is not a single observation")  # noqa: TRY301
                outputs.extend(self._apply(obs, state))
            except (KeyError, TypeError, ValueError, ArithmeticError):
                malformed += 1
        return outputs, malformed

    def _apply(self, obs: Mapping[str, Any], state: ControlState) -> list[Output]:
        _check_numbers(obs)  # also for records an older worker or a tool appended
        kind = obs["k"]
        if kind in ("inf", "st"):
            state.devices[str(obs["device_id"])] = str(obs["cohort"])
        handler = self._handlers.get(kind)
        if handler is None:
            raise ValueError(f"unknown observation kind {kind!r}")
        return handler(obs, state)

    def _observe(self, obs: Mapping[str, Any], state: ControlState) -> list[Output]:
        item: signals.Obs | None
        if obs["k"] == "inf":
            # Per event: built from the keys directly (no dict of the fields first); keys
            # other than those `observation` writes are malformed, as before.
            keys = obs.keys()
            if keys not in (_INF_KEYS, _INF_KEYS_NO_ID):
                raise TypeError(f"an inference observation has keys {sorted(obs)}")
            item = signals.InferenceObs(
                device_id=obs["device_id"], cohort=obs["cohort"], ts_us=obs["ts_us"],
                model_version=int(obs["model_version"]), confidence=obs["confidence"],
                decision=obs["decision"], latency_ms=obs["latency_ms"],
            )  # fmt: skip
            self._judge_event(obs, item, state)
        elif obs["k"] == "st":
            fields = {k: v for k, v in obs.items() if k not in ("k", "event_id", "model_version")}
            item = signals.StatusObs(**fields)
        else:
            item = self._verdict(obs, state)
            if item is not None:
                self._judge_verdict(obs, item.cohort, state)
        if item is None:
            return []
        return self._signals(signals.observe(item, state.signals, self.s.signals), state)

    def _release(self, obs: Mapping[str, Any], state: ControlState) -> list[Output]:
        """A release on `ml.model-releases.v1` (the trainer's, or our own steps read back):
        FULL releases are the parents rollbacks reinstall; a new CANARY starts a rollout."""
        rel = {k: v for k, v in obs.items() if k != "k"}
        cohort, version = str(rel["cohort"]), int(rel["model_version"])
        if rel["stage"] == "FULL":
            if version >= int(state.full.get(cohort, {}).get("model_version", -1)):
                state.full[cohort] = rel
            return []
        current = state.rollouts.get(cohort)
        if rel["stage"] != "CANARY" or (current is not None and current["version"] >= version):
            return []  # a step of ours read back, or an older/repeated canary
        parent = state.full.get(cohort)
        if parent is None or int(parent["model_version"]) != rel.get("parent_version"):
            state.rollouts_unparented += 1  # no artifact to roll back to: not judged
            return []
        state.rollouts[cohort] = judge.start(rel, parent, self.s.judge).to_json()
        return []

    def _rollout(self, cohort: str, state: ControlState) -> judge.RolloutState | None:
        data = state.rollouts.get(cohort)
        return None if data is None else judge.RolloutState.from_json(data)

    def _judge_event(
        self, obs: Mapping[str, Any], item: signals.InferenceObs, state: ControlState
    ) -> None:
        rollout = self._rollout(item.cohort, state)
        arm = rollout.arm(item.model_version) if rollout is not None else None
        if rollout is not None and arm is not None:
            arm.add_event(str(obs["event_id"]), item.confidence, item.latency_ms,
                          item.decision == "OFFLOAD")  # fmt: skip
            state.rollouts[item.cohort] = rollout.to_json()

    def _judge_verdict(self, obs: Mapping[str, Any], cohort: str, state: ControlState) -> None:
        rollout = self._rollout(cohort, state)
        arm = rollout.arm(int(obs["model_version"])) if rollout is not None else None
        if rollout is not None and arm is not None:
            arm.add_verdict(bool(obs["agree"]))
            state.rollouts[cohort] = rollout.to_json()

    def _judge_windows(self, end: int, state: ControlState) -> list[Output]:
        out: list[Output] = []
        for cohort in sorted(state.rollouts):
            rollout = self._rollout(cohort, state)
            assert rollout is not None
            steps, _ = judge.judge_window(end, rollout, self.s.judge)
            state.rollouts[cohort] = rollout.to_json()
            for rec in steps:
                # The devices install a CANARY/WAVE step iff membership_score < share.
                rec["share"] = judge.share(rollout, self.s.judge) if rollout.stage in (
                    "CANARY", "WAVE") else 1.0  # fmt: skip
                out.append((RELEASES_TOPIC, cohort, rec))
        return out

    def _manual(self, obs: Mapping[str, Any], state: ControlState) -> list[Output]:
        trig = self._triggers(state, None)
        request_id = str(obs["id"])
        reason = triggers.manual_drop_reason(request_id, trig, self.s.triggers)
        if reason is not None or trig is None:  # None: no hard example seen yet
            self._dropped.append({
                "request_id": request_id,
                "reason": reason or triggers.DROP_TOO_FEW_EXAMPLES,
                "uncovered": trig.uncovered if trig is not None else 0,
                "min_examples": self.s.triggers.min_examples,
            })  # fmt: skip
            return []
        detail = str(obs.get("detail", ""))
        return self._fired(
            triggers.manual(request_id, int(obs["ts"]), trig, self.s.triggers, detail), state
        )

    def _capacity(self, obs: Mapping[str, Any], state: ControlState) -> list[Output]:
        """An operator's capacity: in the state from this record on (a function of the log,
        so a replay restores it), used by every window decided after it."""
        per_s = obs["per_s"]
        if per_s is None:
            state.capacity = None
            return []
        value = float(per_s)
        if not (math.isfinite(value) and value >= MIN_CAPACITY_PER_S):  # any writer's record
            raise ValueError(f"capacity override {per_s!r} is below {MIN_CAPACITY_PER_S:g}/s")
        state.capacity = {"per_s": value, "ts": int(obs["ts"]), "offset": state.offset}
        return []

    def capacity_in_force(
        self, state: ControlState, fleet: Mapping[str, float] | None = None
    ) -> tuple[float, str]:
        """C (offloads/s) and its source for a decision now (threshold.capacity_in_force)."""
        override = None if state.capacity is None else float(state.capacity["per_s"])
        if fleet is None:
            fleet = {}
            if state.teacher_capacity is not None:
                fleet = {"teacher_capacity_per_s": float(state.teacher_capacity["per_s"])}
        return threshold.capacity_in_force(override, fleet, self.s.threshold)

    def _measure_teachers(self, end_us: int, state: ControlState) -> dict[str, float]:
        """The fleet's teacher rate at a window end, and the capacity it implies.

        The setting `cloud_capacity_per_s` is what the teacher is assumed to sustain and
        also the most the cloud may spend; a measurement only ever lowers it. A worker
        is fresh when its newest tick is at most `measured_stale_s` old. When every
        fresh worker is saturated (busy at least `measured_min_busy` of its span, with at
        least `measured_min_backlog` offloads waiting on its partitions), the sum of
        their offloads per second is the teacher's capacity: below the setting it is
        remembered and used, down as well as up. Not saturated, the sum of offloads per
        busy second is a lower bound (see `agents.teacher_rate`): above the remembered
        capacity it replaces it (a teacher that got faster, a worker added). Either one
        at or above the setting clears the measurement, and the setting stands again.
        An operator's override wins over both (`threshold.capacity_in_force`).

        Returns:
            FLEET values: `teacher_rate_per_s` (per busy second, summed), `teacher_busy`
            (the least busy fresh worker's share), `teacher_workers`,
            `teacher_service_p99_ms` (the slowest fresh worker's service time p99, which
            the latency SLO uses) and `teacher_capacity_per_s` once measured.
        """
        ts = self.s.threshold
        fresh = {
            w: m for w, m in state.teachers.items()
            if end_us - int(m["ts"]) <= ts.measured_stale_s * 1e6
        }  # fmt: skip
        for w in [w for w in state.teachers if w not in fresh]:
            del state.teachers[w]  # a stopped (or restarted) worker's last words
        out: dict[str, float] = {}
        if fresh:
            rate = sum(float(m["per_s"]) for m in fresh.values())
            busy = min(float(m["busy"]) for m in fresh.values())
            out = {"teacher_rate_per_s": rate, "teacher_busy": busy,
                   "teacher_workers": float(len(fresh))}  # fmt: skip
            services = [m["service_p99_ms"] for m in fresh.values() if "service_p99_ms" in m]
            if services:  # the slowest worker's: an offload may land on any of them
                out["teacher_service_p99_ms"] = float(max(services))
            saturated = all(
                float(m["busy"]) >= ts.measured_min_busy
                and float(m["behind"]) >= ts.measured_min_backlog
                for m in fresh.values()
            )
            known = state.teacher_capacity
            measured: float | None = None
            if saturated:
                measured = max(sum(float(m["wall_per_s"]) for m in fresh.values()), 1e-3)
            elif known is not None and rate > known["per_s"]:
                measured = rate  # proven since: the teacher does at least this much now
            if measured is not None:
                # The setting is also the operator's ceiling (what the cloud may spend):
                # a measurement at or above it hands the decision back to the setting.
                below = measured < ts.cloud_capacity_per_s
                state.teacher_capacity = {"per_s": measured, "ts": float(end_us)} if below else None
            out["teacher_saturated"] = float(saturated)
        if state.teacher_capacity is not None:
            out["teacher_capacity_per_s"] = float(state.teacher_capacity["per_s"])
        return out

    def _remember(self, obs: Mapping[str, Any], state: ControlState) -> list[Output]:
        state.pending[str(obs["id"])] = [str(obs["cohort"]), float(obs["confidence"]),
                                         str(obs["reason"])]  # fmt: skip
        while len(state.pending) > self.s.wiring.max_pending_requests:
            state.pending.pop(next(iter(state.pending)))
            state.pending_forgotten += 1
        return []

    def _verdict(self, obs: Mapping[str, Any], state: ControlState) -> signals.VerdictObs | None:
        found = state.pending.pop(str(obs["request"]), None)
        if found is None:
            return None  # its request was forgotten (or predates this state): no weight known
        cohort, confidence, reason = found
        c = state.controller.cohorts.get(cohort)
        audit = c.audit_rate if c is not None else self.s.threshold.audit_floor
        prob = 1.0 if reason != "AUDIT" else min(1.0, max(audit, 1e-6))
        return signals.VerdictObs(
            device_id=str(obs["device_id"]), cohort=cohort, ts_us=int(obs["ts"]),
            edge_confidence=confidence, decision=reason, agree=bool(obs["agree"]),
            latency_ms=float(obs["latency_ms"]), inclusion_prob=prob,
        )  # fmt: skip

    def _triggers(self, state: ControlState, version: int | None) -> triggers.TriggerState | None:
        if state.triggers is None:
            if version is None:
                return None
            state.triggers = triggers.TriggerState(self.s.wiring.model_name, version)
        elif version is not None and version > state.triggers.serving_version:
            # Hard examples of a newer version: that version serves now (until the judge
            # reports FULL releases, the newest version seen stands for the serving one).
            triggers.set_serving_version(state.triggers, version)
        return state.triggers

    def _hard(self, obs: Mapping[str, Any], state: ControlState) -> list[Output]:
        trig = self._triggers(state, int(obs["model_version"]))
        assert trig is not None
        hard = triggers.HardObs(int(obs["partition"]), int(obs["offset"]),
                                int(obs["model_version"]), int(obs["ts"]))  # fmt: skip
        before = trig.uncovered
        out = triggers.on_hard(hard, trig, self.s.triggers)
        state.hard_since_trigger += trig.uncovered - before if not out else 0
        return self._fired(out, state)

    def _tick(self, obs: Mapping[str, Any], state: ControlState) -> list[Output]:
        now = int(obs["ts"])
        out: list[Output] = []
        lag = obs.get("lag_s")
        if obs.get("worker") is not None and obs.get("teacher_per_s") is not None:
            state.teachers[str(obs["worker"])] = {
                "per_s": float(obs["teacher_per_s"]),
                "wall_per_s": float(obs["teacher_wall_per_s"]),
                "busy": float(obs["teacher_busy"]),
                "behind": float(obs.get("behind") or 0),
                "ts": float(now),
            }
            if obs.get("teacher_service_p99_ms") is not None:  # older workers' ticks lack it
                state.teachers[str(obs["worker"])]["service_p99_ms"] = float(
                    obs["teacher_service_p99_ms"]
                )
        if obs.get("behind") is not None:
            # Messages behind -> seconds at the capacity in force now (the override too).
            lag = int(obs["behind"]) / self.capacity_in_force(state)[0]
        if lag is not None:
            closed = signals.observe(signals.LagObs(now, float(lag)), state.signals,
                                     self.s.signals)  # fmt: skip
        else:
            closed = signals.tick(now, state.signals, self.s.signals)
        out.extend(self._signals(closed, state))
        if state.triggers is not None:
            out.extend(self._fired(triggers.on_tick(now, state.triggers, self.s.triggers), state))
        return out

    def _fired(self, records: list[dict[str, Any]], state: ControlState) -> list[Output]:
        if records:
            state.hard_since_trigger = state.triggers.uncovered if state.triggers else 0
            state.fired += len(records)
        return [(TRIGGERS_TOPIC, r["model_name"], r) for r in records]

    def _signals(self, closed: list[dict[str, Any]], state: ControlState) -> list[Output]:
        """Emit the closed windows; run the controller once per window end, and feed COHORT
        PSI to the drift trigger."""
        uncovered = float(state.triggers.uncovered) if state.triggers is not None else 0.0
        for r in closed:
            if r["scope"] == "FLEET":  # `edgeloop control status` reads it from here
                values = r["values"]
                values["hard_examples_uncovered"] = uncovered
                values.update(self._measure_teachers(int(r["window_end"]), state))
                c, source = self.capacity_in_force(state, values)
                values["capacity_per_s"] = c
                if source == "override":
                    values["capacity_override_per_s"] = c
        out: list[Output] = [(SIGNALS_TOPIC, r["scope_id"], r) for r in closed]
        by_end: dict[int, list[dict[str, Any]]] = {}
        for r in closed:
            by_end.setdefault(int(r["window_end"]), []).append(r)
        for end in sorted(by_end):
            rs = by_end[end]
            cohorts = {r["scope_id"]: r["values"] for r in rs if r["scope"] == "COHORT"}
            fleet: Mapping[str, float] = next(
                (r["values"] for r in rs if r["scope"] == "FLEET"), {}
            )
            devices = {
                r["scope_id"]: (state.devices[r["scope_id"]], r["values"])
                for r in rs
                if r["scope"] == "DEVICE" and r["scope_id"] in state.devices
            }
            if cohorts:
                override = None if state.capacity is None else float(state.capacity["per_s"])
                inputs = threshold.WindowInputs(end, cohorts, devices, fleet, override)
                updates = threshold.step(inputs, state.controller, self.s.threshold,
                                         self.s.signals.buckets)  # fmt: skip
                out.extend((THRESHOLDS_TOPIC, u["scope_id"], u) for u in updates)
            out.extend(self._judge_windows(end, state))
            if state.triggers is not None:
                for r in rs:
                    if r["scope"] == "COHORT":
                        fired = triggers.on_signal(r, state.triggers, self.s.triggers)
                        out.extend(self._fired(fired, state))
        return out

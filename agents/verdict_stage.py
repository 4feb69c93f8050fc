"""Stages 3-4: OffloadRequest -> teacher -> CloudVerdict, and the hard-example router.

Two pure halves around the (async, batched) teacher call the agent makes:

- `prepare`: decode each request (bounded), check it, dedupe it by `(device_id, seq)`,
  decode its input (`decode_input`, inflate-bounded) into the model's input; failures
  become DeadLetters on `edge.offload.dlq.v1`.
- `finish`: given the teacher's outputs, one CloudVerdict per request (AUDIT samples
  included: the device counts them too) and, when `hard_reasons` finds any reason and the
  budget and the near-duplicate filter let it through, one HardExample.

Output ids derive from the request's id, so a redelivered request produces the same ids.
HardExamples carry the model input (float32, zlib) of the teacher's input shape: exactly
what `train serve` decodes today, whatever encoding the device used.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edgeloop.agents.codec import SchemaBook
from edgeloop.agents.dead_letter import dead_letter
from edgeloop.agents.dedupe import Deduper, Seen
from edgeloop.agents.hardness import (
    HardExampleBudget,
    NearDuplicateFilter,
    RouterConfig,
    hard_reasons,
)
from edgeloop.agents.ids import derived_id
from edgeloop.agents.records import Out, Raw, StepResult
from edgeloop.core.errors import DecodeError, EncodeError
from edgeloop.schemas.events import CloudVerdict, HardExample, HardReason
from edgeloop.schemas.topics import dlq_topic
from edgeloop.tasks.inputs import decode_input, to_model_input

if TYPE_CHECKING:  # the router only reads a verdict; it never loads onnxruntime
    from edgeloop.agents.teacher import TeacherOutput

OFFLOAD = "edge.offload.v1"
VERDICTS = "cloud.verdicts.v1"
HARD_EXAMPLES = "ml.hard-examples.v1"
STAGE = "agents-verdicts"
OFFLOAD_REQUEST = "edgeloop.v1.OffloadRequest"

Preprocess = Callable[[npt.NDArray[np.floating]], npt.NDArray[np.float32]]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request ready for the teacher: the record, its key and its model input."""

    raw: Raw
    request: dict[str, Any]
    x: npt.NDArray[np.float32]


@dataclass(frozen=True)
class RouterPolicy:
    """What the router needs besides the thresholds."""

    config: RouterConfig
    near_duplicates: bool = True
    drifting_cohorts: frozenset[str] = frozenset()


class VerdictStep:
    """The verdict stage's pure parts; holds the router's budget and near-duplicate state
    (in memory: both are admission policies, and a restart that forgets them can only
    admit more, never lose a verdict)."""

    def __init__(
        self,
        book: SchemaBook,
        policy: RouterPolicy,
        *,
        preprocess: Preprocess,
        max_decoded_bytes: int,
        dlq_payload_bytes: int,
    ) -> None:
        self.book = book
        self.policy = policy
        self.preprocess = preprocess
        self.max_decoded_bytes = max_decoded_bytes
        self.dlq_payload_bytes = dlq_payload_bytes
        self.budget = HardExampleBudget(policy.config)
        self.near_dups = NearDuplicateFilter(policy.config)
        self._dlq = dlq_topic(OFFLOAD)

    def prepare(
        self,
        batch: Sequence[Raw],
        dedupe: Deduper,
        input_shape: Sequence[int],
        now_us: int,
    ) -> tuple[list[Prepared], StepResult]:
        """Decode, check and dedupe `batch`; returns what goes to the teacher and the
        dead letters (in `StepResult.outputs`)."""
        result = StepResult()
        ready: list[Prepared] = []
        for raw in batch:
            result.tally["in"] += 1
            try:
                schema, req = self.book.decode(raw.value)
                if schema.name != OFFLOAD_REQUEST:
                    raise DecodeError(  # noqa: TRY301 - one dead-letter path per record
                        f"{raw.topic} carries {schema.name}, expected {OFFLOAD_REQUEST}",
                        reason="wrong_schema",
                        schema=schema.name,
                    )
                device_id = str(req["device_id"])
                if raw.key is not None and raw.key != device_id.encode():
                    raise DecodeError(  # noqa: TRY301
                        f"key {raw.key!r} is not the request's device_id {device_id!r}",
                        reason="key_mismatch",
                        schema=schema.name,
                        path="OffloadRequest.device_id",
                    )
                x = decode_input(
                    req["input"],
                    req["input_encoding"],
                    req["input_shape"],
                    max_decoded_bytes=self.max_decoded_bytes,
                )
                x = to_model_input(
                    x, req["input_encoding"], preprocess=self.preprocess, input_shape=input_shape
                )
            except (DecodeError, ValueError) as exc:
                reason = exc.reason if isinstance(exc, DecodeError) else "bad_input_data"
                self.dead(result, raw, reason, str(exc), now_us)
                continue
            # Dedupe after every check: a bad record is dead-lettered again on redelivery
            # (same dead-letter id), a good one is answered once.
            seen = dedupe.check(device_id, int(req["seq"]))
            if seen is Seen.DUPLICATE:
                result.tally["duplicate"] += 1
                continue
            if seen is Seen.OUT_OF_WINDOW:
                result.tally["out_of_window"] += 1
            ready.append(Prepared(raw, req, x))
        return ready, result

    def finish(
        self,
        ready: Sequence[Prepared],
        outputs: Sequence[TeacherOutput],
        *,
        teacher_name: str,
        teacher_version: int,
        now_us: int,
        result: StepResult,
    ) -> None:
        """Append a CloudVerdict per request, and the HardExamples, to `result`."""
        now_s = now_us / 1e6
        for item, out in zip(ready, outputs, strict=True):
            req, raw = item.request, item.raw
            verdict = verdict_for(req, out, teacher_name, teacher_version, now_us)
            result.emit(Out(VERDICTS, raw.key, self.book.encode(VERDICTS, verdict)))
            try:
                reasons = hard_reasons(
                    edge_prediction=int(req["edge_prediction"]),
                    edge_confidence=float(req["confidence"]),
                    edge_probs=None,  # an OffloadRequest carries only the top confidence
                    teacher=out,
                    audit=req["reason"] == "AUDIT",
                    drifting=req["cohort"] in self.policy.drifting_cohorts,
                    cfg=self.policy.config,
                )
                if not reasons:
                    result.tally["hard:none"] += 1
                    continue
                if self.policy.near_duplicates and self.near_dups.seen(req["device_id"], item.x):
                    result.tally["suppressed:near_duplicate"] += 1
                    continue
                if not self.budget.admit(req["device_id"], now_s):
                    result.tally["suppressed:budget"] += 1
                    continue
                example = hard_example_for(req, item.x, out, reasons, now_us)
                for reason in reasons:
                    result.tally[f"hard:{reason}"] += 1
                value = self.book.encode(HARD_EXAMPLES, example)
                result.emit(Out(HARD_EXAMPLES, raw.key, value))
            except (DecodeError, EncodeError, ValueError) as exc:
                reason = exc.reason if isinstance(exc, DecodeError) else "bad_hard_example"
                self.dead(result, raw, reason, str(exc), now_us)

    def dead(self, result: StepResult, raw: Raw, reason: str, detail: str, now_us: int) -> None:
        result.tally[f"dlq:{reason}"] += 1
        record = dead_letter(
            stage=STAGE,
            reason=reason,
            detail=detail,
            source=raw.source,
            payload=raw.value,
            device_id=raw.key.decode("utf-8", "replace") if raw.key else None,
            cap=self.dlq_payload_bytes,
            now_us=now_us,
        )
        result.emit(Out(self._dlq, raw.key, self.book.encode(self._dlq, record)))


def verdict_for(
    req: dict[str, Any], out: TeacherOutput, teacher_name: str, teacher_version: int, now_us: int
) -> CloudVerdict:
    """The CloudVerdict answering `req` (id derived from the request's id)."""
    return {
        "event_id": derived_id("verdict", str(req["event_id"])),
        "ts": now_us,
        "request_event_id": str(req["event_id"]),
        "device_id": str(req["device_id"]),
        "teacher_model": teacher_name,
        "teacher_version": teacher_version,
        "label": out.label,
        "confidence": out.confidence,
        "edge_prediction": int(req["edge_prediction"]),
        "agree": out.label == int(req["edge_prediction"]),
        "model_version": int(req["model_version"]),
        "latency_ms": max(0.0, (now_us - int(req["ts"])) / 1000.0),
    }


def hard_example_for(
    req: dict[str, Any],
    x: npt.NDArray[np.float32],
    out: TeacherOutput,
    reasons: Sequence[str],
    now_us: int,
) -> HardExample:
    """The HardExample of `req`: its model input as F32_ZLIB, the teacher's label."""
    body = zlib.compress(np.ascontiguousarray(x, dtype="<f4").tobytes(), 1)
    hard: list[HardReason] = [r for r in _REASONS if r in reasons]
    return {
        "event_id": derived_id("hard", str(req["event_id"])),
        "ts": now_us,
        "source_event_id": str(req["event_id"]),
        "device_id": str(req["device_id"]),
        "cohort": str(req["cohort"]),
        "model_version": int(req["model_version"]),
        "input": body,
        "input_encoding": "F32_ZLIB",
        "input_shape": [int(d) for d in x.shape],
        "label": out.label,
        "edge_prediction": int(req["edge_prediction"]),
        "confidence": float(req["confidence"]),
        "reasons": hard,
    }


_REASONS: tuple[HardReason, ...] = (
    "DISAGREE",
    "LOW_CONFIDENCE",
    "LOW_MARGIN",
    "HIGH_ENTROPY",
    "AUDIT",
    "DRIFT",
)

"""The per-frame work: preprocess, run, decide, persist. Runs on the inference thread.

Everything a frame needs happens here in one call, so the event loop only moves frames
and bytes: it never waits on the model or on SQLite. The model and the control state are
read once per frame from attributes that a swap replaces whole, so a frame is served by
exactly one model and one threshold, never a mix.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edgeloop.edge.inference import LoadedModel, now_us
from edgeloop.edge.metrics import EdgeMetrics
from edgeloop.edge.outbox import Outbox
from edgeloop.edge.policy import EncodeFn, OffloadPolicy, confidence, softmax
from edgeloop.edge.source import Frame
from edgeloop.edge.state import AppliedThreshold
from edgeloop.schemas import catalog
from edgeloop.schemas.events import ConfidenceKind, InferenceEvent, OffloadRequest
from edgeloop.schemas.framing import SingleObjectCodec
from edgeloop.schemas.topics import UplinkKind

INFERENCE = catalog.get("InferenceEvent")
OFFLOAD = catalog.get("OffloadRequest")


class Preprocessor(Protocol):
    """The part of a task plug-in a device needs (edgeloop.tasks.base.Task satisfies it).

    Declared here rather than imported: the task modules also describe the cloud-side
    torch builders, and a Pi must not import them, not even for types.
    """

    name: str
    input_shape: tuple[int, int, int]

    def preprocess(self, raw: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    seq: int
    decision: str
    confidence: float
    prediction: int
    model_version: int
    total_us: int
    stored: bool
    evicted: int  # older events the outbox dropped to make room (drop_oldest)
    unstored: int = 0  # events of this frame the disk refused (inference, offload)


class PendingVerdicts:
    """Offloads waiting for a CloudVerdict: event id -> (edge prediction, when it was
    offloaded on the monotonic clock), oldest forgotten."""

    def __init__(self, capacity: int) -> None:
        self._items: OrderedDict[str, tuple[int, float | None]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()
        self.forgotten = 0

    def add(self, event_id: str, prediction: int, sent_at: float | None = None) -> None:
        with self._lock:
            self._items[event_id] = (prediction, sent_at)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)
                self.forgotten += 1

    def pop(self, event_id: str) -> int | None:
        taken = self.take(event_id)
        return None if taken is None else taken[0]

    def take(self, event_id: str) -> tuple[int, float | None] | None:
        """The pending offload's (prediction, sent_at), removed; None when unknown."""
        with self._lock:
            return self._items.pop(event_id, None)


class Pipeline:
    def __init__(
        self,
        *,
        device_id: str,
        cohort: str,
        task: Preprocessor,
        model: LoadedModel,
        threshold: AppliedThreshold,
        policy: OffloadPolicy,
        outbox: Outbox,
        codec: SingleObjectCodec,
        metrics: EdgeMetrics,
        pending: PendingVerdicts,
    ) -> None:
        self.device_id = device_id
        self.cohort = cohort
        self.task = task
        # Swapped whole by the updater (attribute assignment is atomic under the GIL).
        self.model = model
        self.threshold = threshold
        self.policy = policy
        self.outbox = outbox
        self.codec = codec
        self.pending = pending
        self._m_pre = metrics.latency.labels(device_id, "preprocess")
        self._m_inf = metrics.latency.labels(device_id, "inference")
        self._m_dec = metrics.latency.labels(device_id, "decision")
        self._m_total = metrics.latency.labels(device_id, "total")
        self._metrics = metrics

    def process(self, frame: Frame) -> Outcome:
        model = self.model
        th = self.threshold
        kind: ConfidenceKind = th.confidence_kind  # type: ignore[assignment]
        t0 = time.perf_counter_ns()
        x = self.task.preprocess(frame.raw[None])
        t1 = time.perf_counter_ns()
        logits = model.logits(x)
        t2 = time.perf_counter_ns()
        probs = softmax(logits[0])
        c = confidence(probs, kind)
        prediction = int(probs.argmax())
        verdict = self.policy.decide(
            c, th.tau, th.audit_rate, EncodeFn(frame.raw), time.monotonic()
        )
        t3 = time.perf_counter_ns()
        ts = now_us()
        event: InferenceEvent = {
            "event_id": "",
            "device_id": self.device_id,
            "seq": 0,
            "ts": ts,
            "model_version": model.version,
            "threshold_version": th.version,
            "cohort": self.cohort,
            "prediction": prediction,
            "confidence": c,
            "confidence_kind": kind,
            "probs": probs.tolist(),
            "threshold": th.tau,
            "decision": verdict.decision,
            "exit_index": 0,
            "latency": {
                "preprocess_us": (t1 - t0) // 1000,
                "inference_us": (t2 - t1) // 1000,
                "decision_us": (t3 - t2) // 1000,
            },
            "frame_ts": frame.ts_us,
        }
        done = self.outbox.append(
            UplinkKind.INFERENCE.value,
            lambda seq: self._encode(INFERENCE, event, seq),
            created_us=ts,
            count="inference",
        )
        # A full disk does not stop the decision: the event is counted as unstored. Its
        # offload request is not attempted (it would name a seq that was never used).
        unstored = 1 if done.error is not None else 0
        if verdict.offload_bytes is not None and done.error is not None:
            unstored += 1
        elif verdict.offload_bytes is not None:
            payload = verdict.offload_bytes
            request: OffloadRequest = {
                "event_id": "",
                "device_id": self.device_id,
                "seq": 0,
                "ts": ts,
                "model_version": model.version,
                "threshold_version": th.version,
                "cohort": self.cohort,
                "inference_event_id": f"{self.device_id}:{done.seq}",
                "reason": verdict.decision,
                "edge_prediction": prediction,
                "confidence": c,
                "input": payload,
                "input_encoding": "U8_ZLIB",
                "input_shape": list(frame.raw.shape),
            }
            off = self.outbox.append(
                UplinkKind.OFFLOAD.value,
                lambda seq: self._encode(OFFLOAD, request, seq),
                created_us=ts,
            )
            if off.stored:
                self.pending.add(f"{self.device_id}:{off.seq}", prediction, time.monotonic())
                self._metrics.offload_bytes.labels(self.device_id).inc(len(payload))
            unstored += 1 if off.error is not None else 0
        elif verdict.wanted != "LOCAL":
            self._metrics.over_budget.labels(self.device_id, verdict.wanted).inc()
        t4 = time.perf_counter_ns()
        self._m_pre.observe((t1 - t0) / 1e9)
        self._m_inf.observe((t2 - t1) / 1e9)
        self._m_dec.observe((t3 - t2) / 1e9)
        self._m_total.observe((t4 - t0) / 1e9)
        self._metrics.decisions.labels(self.device_id, self.cohort, verdict.decision).inc()
        if frame.label is not None:
            # Ground truth, known only to simulators: the demo's accuracy per cohort and
            # serving version is measured here, never inferred from the events.
            correct = "true" if prediction == frame.label else "false"
            self._metrics.predictions.labels(self.cohort, str(model.version), correct).inc()
        return Outcome(
            done.seq,
            verdict.decision,
            c,
            prediction,
            model.version,
            (t4 - t0) // 1000,
            done.stored,
            done.evicted,
            unstored,
        )

    def _encode(self, schema: Any, record: Any, seq: int) -> bytes:
        record["seq"] = seq
        record["event_id"] = f"{self.device_id}:{seq}"
        return self.codec.encode(schema, record)

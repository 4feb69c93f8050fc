"""Records and codecs for the agents' unit tests (no Kafka, no registry)."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from edgeloop.agents.codec import SchemaBook
from edgeloop.agents.records import Raw
from edgeloop.schemas import catalog
from edgeloop.schemas.bounded import DecodeLimits
from edgeloop.schemas.topics import dlq_topic

IDS = {
    "InferenceEvent": 1,
    "OffloadRequest": 2,
    "DeviceRecord": 3,
    "DeviceStatus": 4,
    "EnrichedInferenceEvent": 10,
    "CloudVerdict": 11,
    "HardExample": 12,
    "DeadLetter": 13,
}


def book() -> SchemaBook:
    """A codec knowing the device schemas by fixed ids and the agents' output topics."""
    b = SchemaBook(None, DecodeLimits())
    for name in ("InferenceEvent", "OffloadRequest", "DeviceRecord", "DeviceStatus"):
        b.codec.add(IDS[name], catalog.get(name))
    b.add_output("edge.inference.enriched.v1", 10, catalog.get("EnrichedInferenceEvent"))
    b.add_output("cloud.verdicts.v1", 11, catalog.get("CloudVerdict"))
    b.add_output("ml.hard-examples.v1", 12, catalog.get("HardExample"))
    for src in ("edge.inference.v1", "edge.offload.v1", "fleet.devices.v1", "edge.status.v1"):
        b.add_output(dlq_topic(src), 13, catalog.get("DeadLetter"))
    return b


def frame(name: str, record: dict[str, Any]) -> bytes:
    return book().codec.encode(IDS[name], catalog.get(name), record)


def inference(device: str, seq: int, cohort: str = "control") -> dict[str, Any]:
    return {
        "event_id": f"{device}:{seq}", "device_id": device, "seq": seq,
        "ts": 1_700_000_000_000_000 + seq, "model_version": 1, "threshold_version": 0,
        "cohort": cohort, "prediction": 3, "confidence": 0.5, "confidence_kind": "MAX_PROB",
        "probs": [0.5, 0.25, 0.25], "threshold": 0.625, "decision": "OFFLOAD", "exit_index": 0,
        "latency": {"preprocess_us": 1, "inference_us": 2, "decision_us": 3}, "frame_ts": None,
    }  # fmt: skip


def offload(
    device: str, seq: int, *, pixels: np.ndarray | None = None, reason: str = "OFFLOAD",
    confidence: float = 0.4, prediction: int = 3, encoding: str = "U8_ZLIB",
    data: bytes | None = None, shape: list[int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    img = pixels if pixels is not None else np.full((8, 8), 0.5, np.float32)
    body = data if data is not None else zlib.compress((img * 255).astype(np.uint8).tobytes())
    return {
        "event_id": f"{device}:{seq}", "device_id": device, "seq": seq,
        "ts": 1_700_000_000_000_000, "model_version": 1, "threshold_version": 0,
        "cohort": "canary", "inference_event_id": f"{device}:{seq - 1}", "reason": reason,
        "edge_prediction": prediction, "confidence": confidence, "input": body,
        "input_encoding": encoding, "input_shape": shape if shape is not None else [8, 8],
    }  # fmt: skip


def raw(value: bytes, key: str | None, topic: str = "edge.inference.v1", offset: int = 0) -> Raw:
    return Raw(value, key.encode() if key is not None else None, topic, 0, offset)

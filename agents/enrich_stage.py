"""Stage 1-2: InferenceEvent -> dedupe -> EnrichedInferenceEvent (a pure step function).

Per record: decode (bounded, by writer schema id), check it is an InferenceEvent keyed by
its own device, drop it when its `(device_id, seq)` was seen (the dedupe window), join it
with the device's fleet tail (else its latest status tail, else the event's own cohort;
both flagged) and frame the enriched record. Anything that fails becomes a DeadLetter on
`edge.inference.dlq.v1` with the reason: a bad record never stops the batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from edgeloop.agents.codec import SchemaBook
from edgeloop.agents.dead_letter import dead_letter
from edgeloop.agents.dedupe import Deduper, Seen
from edgeloop.agents.enrich import (
    BASE,
    ENRICHED,
    enriched_record,
    source_of,
    tail_fields,
)
from edgeloop.agents.enrich import unknown_device as unknown_tail
from edgeloop.agents.records import Out, Raw, StepResult
from edgeloop.core.errors import DecodeError, EncodeError
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.framing import CONFLUENT_HEADER
from edgeloop.schemas.topics import dlq_topic

INFERENCE = "edge.inference.v1"
ENRICHED_TOPIC = "edge.inference.enriched.v1"
STAGE = "agents-enrich"

TailLookup = Callable[[str], bytes | None]
Observe = Callable[[str, dict[str, Any], Raw], None]


class EnrichStep:
    """`run(batch, ...)`: the enrich stage's step; holds only caches (no Kafka, no Faust)."""

    def __init__(self, book: SchemaBook, *, dlq_payload_bytes: int) -> None:
        self.book = book
        self.dlq_payload_bytes = dlq_payload_bytes
        self._dlq = dlq_topic(INFERENCE)
        # Tails of devices missing from both tables, by cohort (a handful of entries).
        self._cohort_tails: dict[str, bytes] = {}

    def run(
        self,
        batch: Sequence[Raw],
        dedupe: Deduper,
        fleet: TailLookup,
        status: TailLookup,
        now_us: int,
        *,
        observe: Observe | None = None,
    ) -> StepResult:
        """Enrich `batch`; returns the records to produce (in order) and the tally.

        Args:
            batch: consumed InferenceEvent messages (Confluent framed).
            dedupe: this batch's dedupe state (written back by the caller after the
                outputs are acknowledged).
            fleet: device id -> fleet tail (registered devices).
            status: device id -> tail from its latest DeviceStatus.
            now_us: the clock, for dead letters.
            observe: called with (schema name, decoded event, raw) for each event
                enriched (not for duplicates or dead letters): the control plane's
                observations, without decoding the batch a second time.
        """
        result = StepResult()
        tally = result.tally
        header = self.book.header(ENRICHED_TOPIC)
        base_fp = BASE.fingerprint
        decode = self.book.decode
        outputs = result.outputs
        # Counted in locals and added to the tally once: this loop runs per event.
        duplicates = out_of_window = enriched = 0
        sources: Counter[bytes] = Counter()
        for raw in batch:
            try:
                schema, event = decode(raw.value)
                device_id = _check(schema, event, raw)
                seen = dedupe.check(device_id, event["seq"])
                if seen is Seen.DUPLICATE:
                    duplicates += 1
                    continue
                if seen is Seen.OUT_OF_WINDOW:
                    out_of_window += 1
                tail = fleet(device_id) or status(device_id) or self._unknown(event["cohort"])
                sources[tail[:1]] += 1
                if schema.fingerprint == base_fp:
                    value = header + raw.value[CONFLUENT_HEADER:] + tail
                else:
                    value = self._reencode(event, tail)
                outputs.append(Out(ENRICHED_TOPIC, raw.key, value))
                enriched += 1
                if observe is not None:
                    observe(schema.name, event, raw)
            except (DecodeError, EncodeError) as exc:
                reason = exc.reason if isinstance(exc, DecodeError) else "incompatible_writer"
                self._dead(result, raw, reason, str(exc), now_us)
        tally["in"] += len(batch)
        if enriched:
            tally[f"out:{ENRICHED_TOPIC}"] += enriched
        if duplicates:
            tally["duplicate"] += duplicates
        if out_of_window:
            tally["out_of_window"] += out_of_window
        for first, n in sources.items():
            tally[f"enrich:{source_of(first)}"] += n
        return result

    def _unknown(self, cohort: str) -> bytes:
        tail = self._cohort_tails.get(cohort)
        if tail is None:
            if len(self._cohort_tails) > 1024:  # bounded: cohorts are few; a flood is not
                self._cohort_tails.clear()
            tail = self._cohort_tails[cohort] = unknown_tail(cohort).tail()
        return tail

    def _reencode(self, event: dict[str, object], tail: bytes) -> bytes:
        # Another InferenceEvent version wrote this body, so it cannot be reused as is:
        # rebuild the record (missing fields take their defaults) and encode it.
        return self.book.encode(ENRICHED_TOPIC, enriched_record(event, tail_fields(tail)))

    def _dead(self, result: StepResult, raw: Raw, reason: str, detail: str, now_us: int) -> None:
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


def _check(schema: EventSchema, event: dict[str, object], raw: Raw) -> str:
    """The event's device id, after checking it is an InferenceEvent under its own key."""
    if schema.name != BASE.name:
        raise DecodeError(
            f"{raw.topic} carries {schema.name}, expected {BASE.name}",
            reason="wrong_schema",
            schema=schema.name,
        )
    device_id = str(event["device_id"])
    if raw.key is not None and raw.key != device_id.encode():
        raise DecodeError(
            f"key {raw.key!r} is not the event's device_id {device_id!r}",
            reason="key_mismatch",
            schema=schema.name,
            path="InferenceEvent.device_id",
        )
    return device_id


__all__ = ["ENRICHED", "ENRICHED_TOPIC", "INFERENCE", "EnrichStep"]

"""Hard examples from Kafka: exactly the offset ranges a `TrainingTrigger` names.

A trigger names half-open ranges `[start_offset, end_offset)` of `ml.hard-examples.v1`
partitions. The reader assigns a group-less consumer to exactly those partitions, checks
that every range is still (or already) in the log, seeks to `start_offset` and reads until
`end_offset`, so a training run sees the same samples however often it is repeated. It
never commits: reading ranges is a pure function of the log.

Decoding turns `HardExample` events into the trainer's `HardExampleSet`: the input tensor
(decoded by `edgeloop.tasks.inputs`, the decoder the cloud worker uses too: F32 raw/zlib
of the task's input shape, or U8 raw/zlib, JPEG, PNG pixels of the raw sample, which the
task's preprocess turns into the model input), the teacher's label and the reason.
Anything the trainer cannot use fails the whole trigger with a reason tag, never silently
shrinks it: a run on part of a range would not be the run the trigger asked for.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

from edgeloop.core.errors import DecodeError, EdgeloopError
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.framing import ConfluentCodec
from edgeloop.tasks.inputs import PIXEL_ENCODINGS, InputDecodeError, Preprocess, to_model_input
from edgeloop.tasks.inputs import decode_input as shared_decode_input
from edgeloop.trainer.hard_examples import HardExampleSet

HARD_EXAMPLE = "edgeloop.v1.HardExample"

# HardExample.reasons (the router's vocabulary) -> the trainer's coarser HardExampleSet
# reasons. A sample with several reasons gets the first in this order: disagreement with
# the teacher says the most about what the edge model gets wrong.
_REASON_ORDER: tuple[tuple[str, str], ...] = (
    ("DISAGREE", "disagreement"),
    ("LOW_CONFIDENCE", "low_confidence"),
    ("LOW_MARGIN", "low_confidence"),
    ("HIGH_ENTROPY", "low_confidence"),
    ("DRIFT", "drift"),
    ("AUDIT", "audit"),
)
# Inputs are small images; a hard example that decodes past this is hostile or broken.
_MAX_INPUT = 1 << 20
# The shared decoder's reasons -> this reader's (kept so dead-letter tags stay stable).
_REASON_OF = {"bad_input_encoding": "unsupported_encoding"}


class TriggerRejectedError(EdgeloopError):
    """The trigger cannot be handled as given; `reason` is the dead-letter reason tag.

    Not retriable: the same trigger fails the same way (the log only loses old offsets).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RangeReadStalledError(EdgeloopError):
    """Ranges known to be in the log did not arrive in time: retry, do not reject."""

    retriable = True


@dataclass(frozen=True)
class OffsetRange:
    topic: str
    partition: int
    start: int  # first offset included
    end: int  # first offset not included

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def lineage_key(self) -> str:
        return f"{self.topic}/{self.partition}"

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}[{self.start},{self.end})"

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> OffsetRange:
        return cls(
            str(rec["topic"]),
            int(rec["partition"]),
            int(rec["start_offset"]),
            int(rec["end_offset"]),
        )


def check_ranges(ranges: Sequence[OffsetRange], *, max_examples: int) -> None:
    """Static checks, before touching Kafka: non-empty, well-formed, not overlapping."""
    if not ranges:
        raise TriggerRejectedError("trigger names no offset ranges", reason="empty_range")
    for r in ranges:
        if r.start < 0 or r.partition < 0:
            raise TriggerRejectedError(
                f"range {r}: negative offset or partition", reason="bad_range"
            )
        if r.size <= 0:
            raise TriggerRejectedError(
                f"range {r} is empty (end_offset must be > start_offset)", reason="empty_range"
            )
    by_tp: dict[TopicPartition, list[OffsetRange]] = {}
    for r in ranges:
        by_tp.setdefault(r.tp, []).append(r)
    for tp_ranges in by_tp.values():
        tp_ranges.sort(key=lambda r: r.start)
        for a, b in itertools.pairwise(tp_ranges):
            if b.start < a.end:
                # Overlap would train on the same samples twice and break the count.
                raise TriggerRejectedError(f"ranges {a} and {b} overlap", reason="bad_range")
    total = sum(r.size for r in ranges)
    if total > max_examples:
        raise TriggerRejectedError(
            f"ranges hold {total} hard examples, more than the limit of {max_examples}",
            reason="too_many_examples",
        )


def decode_input(
    record: dict[str, Any],
    input_shape: tuple[int, ...],
    *,
    preprocess: Preprocess | None = None,
) -> npt.NDArray[np.float32]:
    """The model input tensor of a HardExample, decoded by the shared `decode_input`.

    F32 encodings must already be the task's input shape. Pixel encodings (U8_*, JPEG,
    PNG) carry the raw sample in [0, 1] and go through the task's `preprocess`; without
    one they are refused (guessing a scale would train on wrong inputs unnoticed).

    Raises:
        DecodeError: reason bad_input (what is wrong is in the message) or
            unsupported_encoding.
    """
    encoding = str(record["input_encoding"])
    shape = tuple(int(d) for d in record["input_shape"])
    if encoding not in PIXEL_ENCODINGS and shape != input_shape:
        raise DecodeError(
            f"input_shape {list(shape)} is not the task's {list(input_shape)}",
            reason="bad_input",
            schema=HARD_EXAMPLE,
            path="HardExample.input_shape",
        )
    if encoding in PIXEL_ENCODINGS and preprocess is None:
        raise DecodeError(
            f"input_encoding {encoding} needs the task's preprocess, which this reader "
            "was not given",
            reason="unsupported_encoding",
            schema=HARD_EXAMPLE,
            path="HardExample.input_encoding",
        )
    try:
        x = shared_decode_input(record["input"], encoding, shape, max_decoded_bytes=_MAX_INPUT)
        if preprocess is not None:
            x = to_model_input(x, encoding, preprocess=preprocess, input_shape=input_shape)
    except InputDecodeError as exc:
        raise DecodeError(
            exc.detail,
            reason=_REASON_OF.get(exc.reason, "bad_input"),
            schema=HARD_EXAMPLE,
            path=f"HardExample.{exc.path}",
        ) from exc
    return x


def trainer_reason(reasons: Sequence[str]) -> str:
    for symbol, reason in _REASON_ORDER:
        if symbol in reasons:
            return reason
    raise DecodeError(
        f"reasons {list(reasons)} name none the trainer knows",
        reason="bad_input",
        schema=HARD_EXAMPLE,
        path="HardExample.reasons",
    )


def to_example_set(
    records: Sequence[dict[str, Any]],
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    preprocess: Preprocess | None = None,
) -> HardExampleSet:
    """Records (as `RangeReader.read` returns them) -> the set the trainer trains on.

    `preprocess` (the task's) is what pixel-encoded inputs need; see `decode_input`.

    TriggerRejectedError(reason=bad_hard_example) names the first unusable record.
    """
    xs, labels, reasons = [], [], []
    for rec in records:
        try:
            label = int(rec["label"])
            if not 0 <= label < num_classes:
                raise DecodeError(  # noqa: TRY301 - one error path for every bad field
                    f"label {label} is outside 0..{num_classes - 1}",
                    reason="bad_input",
                    schema=HARD_EXAMPLE,
                    path="HardExample.label",
                )
            xs.append(decode_input(rec, input_shape, preprocess=preprocess))
            reasons.append(trainer_reason(rec["reasons"]))
        except DecodeError as exc:
            where = rec.get("_source", "a hard example")
            raise TriggerRejectedError(f"{where}: {exc}", reason="bad_hard_example") from exc
        labels.append(label)
    return HardExampleSet(
        x=np.stack(xs).astype(np.float32) if xs else np.zeros((0, *input_shape), np.float32),
        label=np.asarray(labels, dtype=np.int64),
        reason=np.asarray(reasons, dtype=np.str_),
    )


SchemaResolver = Callable[[int], Awaitable[EventSchema]]
# Empty fetches (1 s each) in a row that end the read of a range past the broker's
# reported end offset: nothing more is coming, the range is not in the log.
UNCONFIRMED_EMPTY_POLLS = 3


class RangeReader:
    """Reads exact offset ranges of Confluent-framed HardExample records."""

    def __init__(
        self,
        bootstrap: str,
        resolve: SchemaResolver,
        *,
        client_id: str,
        codec: ConfluentCodec,
        timeout_s: float,
    ) -> None:
        self._bootstrap = bootstrap
        self._resolve = resolve
        self._client_id = client_id
        self._codec = codec
        self._timeout_s = timeout_s

    async def read(self, ranges: Sequence[OffsetRange]) -> list[dict[str, Any]]:
        """Every record of `ranges`, in range order; TriggerRejectedError names the problem."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            client_id=self._client_id,
            # Never jump elsewhere when retention deletes the range under us: raise, so the
            # trigger fails instead of training on whatever the reset lands on.
            auto_offset_reset="none",
            # A range is read whole; small fetches keep memory flat for big ranges.
            max_partition_fetch_bytes=1 << 20,
        )
        try:
            await consumer.start()
            unconfirmed = await self._check_available(consumer, ranges)
            out: list[dict[str, Any]] = []
            for r in ranges:
                out.extend(await self._read_one(consumer, r, unconfirmed.get(r)))
        except OffsetOutOfRangeError as exc:
            raise TriggerRejectedError(
                f"ranges {', '.join(map(str, ranges))} left the log while being read "
                f"(retention): {exc}",
                reason="range_unavailable",
            ) from exc
        except TimeoutError:
            # The ranges were checked to be in the log: a stall is the broker's trouble,
            # so the trigger is retried (it is not marked handled), not rejected.
            raise RangeReadStalledError(
                f"ranges {', '.join(map(str, ranges))} could not be read within "
                f"{self._timeout_s}s; retrying"
            ) from None
        else:
            return out
        finally:
            await consumer.stop()

    async def _check_available(
        self, consumer: AIOKafkaConsumer, ranges: Sequence[OffsetRange]
    ) -> dict[OffsetRange, int]:
        """Reject ranges on no partition or below the log start; return the ranges that end
        past the broker's reported end offset (range -> that end offset)."""
        for topic in sorted({r.topic for r in ranges}):
            parts = await self._partitions(consumer, topic)
            for r in ranges:
                if r.topic == topic and r.partition not in parts:
                    raise TriggerRejectedError(
                        f"range {r}: topic {topic} has no partition {r.partition}"
                        + (f" (partitions {sorted(parts)})" if parts else " (no such topic)"),
                        reason="range_unavailable",
                    )
        tps = sorted({r.tp for r in ranges})
        consumer.assign(tps)
        # A KafkaError here (broker away) propagates: the caller retries the trigger.
        async with asyncio.timeout(self._timeout_s):
            first = await consumer.beginning_offsets(tps)
            end = await consumer.end_offsets(tps)
        for r in ranges:
            if r.start < first[r.tp]:
                raise TriggerRejectedError(
                    f"range {r} is no longer in the log: it starts at {first[r.tp]} "
                    "(retention deleted the older records)",
                    reason="range_unavailable",
                )
        # The end offset is advisory: Tansu 0.6 reports a log end offset below offsets it
        # serves once a partition holds multi-record batches (measured: 55 while serving
        # 0..79), so a range past it may still be whole in the log. Such a range is read
        # like any other; the read decides (`_read_one`, `unconfirmed`).
        return {r: end[r.tp] for r in ranges if r.end > end[r.tp]}

    async def _partitions(self, consumer: AIOKafkaConsumer, topic: str) -> set[int]:
        # Fresh metadata: the consumer's own cache only knows topics it was assigned, and
        # aiokafka has no public refresh.
        async with asyncio.timeout(self._timeout_s):
            cluster = await consumer._client.fetch_all_metadata()
        return set(cluster.partitions_for_topic(topic) or ())

    async def _read_one(
        self, consumer: AIOKafkaConsumer, r: OffsetRange, reported_end: int | None = None
    ) -> list[dict[str, Any]]:
        """The records of `r`. `reported_end`: the broker's end offset when `r` ends past it
        (unconfirmed): then `UNCONFIRMED_EMPTY_POLLS` empty fetches in a row before the
        range is complete mean it is not in the log (rejected as range_unavailable); a
        confirmed range that stalls is the broker's trouble (TimeoutError: retried)."""
        consumer.seek(r.tp, r.start)
        out: list[dict[str, Any]] = []
        empty = 0
        async with asyncio.timeout(self._timeout_s):
            while await consumer.position(r.tp) < r.end:
                batch = await consumer.getmany(r.tp, timeout_ms=1000, max_records=500)
                records = batch.get(r.tp, [])
                empty = 0 if records else empty + 1
                if reported_end is not None and empty >= UNCONFIRMED_EMPTY_POLLS:
                    raise TriggerRejectedError(
                        f"range {r} is not (yet) in the log: the broker reports its end at "
                        f"{reported_end}, and reading stopped at "
                        f"{await consumer.position(r.tp)}",
                        reason="range_unavailable",
                    )
                for msg in records:
                    if msg.offset >= r.end:
                        return out
                    out.append(await self._decode(r, msg.offset, msg.value))
        return out

    async def _decode(self, r: OffsetRange, offset: int, value: bytes | None) -> dict[str, Any]:
        where = f"{r.topic}/{r.partition}@{offset}"
        if value is None:
            raise TriggerRejectedError(f"{where} is a tombstone", reason="bad_hard_example")
        try:
            schema_id = self._codec.schema_id(value)
            if not self._codec.knows(schema_id):
                self._codec.add(schema_id, await self._resolve(schema_id))
            _, schema, record = self._codec.decode(value)
        except EdgeloopError as exc:
            raise TriggerRejectedError(f"{where}: {exc}", reason="bad_hard_example") from exc
        if schema.name != HARD_EXAMPLE:
            raise TriggerRejectedError(
                f"{where} holds {schema.name}, not {HARD_EXAMPLE}", reason="bad_hard_example"
            )
        record["_source"] = where
        return record

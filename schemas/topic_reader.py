"""Read a Kafka topic from its start (or its last N records per partition) to its end.

One group-less consumer (nothing is committed), assigned every partition of the topic,
reads up to the end offsets taken at the start, and a little past them (see `read_topic`
for why). Used by `edgeloop control status`, the demo's delivery count and the demo
report's lineage: every reader of "the whole topic, now" goes through here, so the
broker facts below are honoured once.

Broker facts this relies on (measured on the brokers the tests run):
- Tansu 0.6 reports end offsets BELOW offsets it serves once a partition holds
  multi-record batches (five records sent as one batch: end offset 1): stopping at the
  reported end misses the newest records. It still reports an end above the start of a
  partition holding anything, so a partition whose end equals its start is empty.
- A first fetch from freshly assigned partitions can come back empty (Tansu on a loaded
  machine: nothing within 5 s, everything within 15 s), so an empty poll before the end
  is reached is no reason to stop; one overall deadline bounds the read instead.
- Right after assign(), aiokafka resets partitions in the background; a late answer to
  that reset used to move a partition seeked to its beginning to its END (see
  `read_topic`): explicit seeks, and resets to the earliest offset, keep every record.
- Shared topics hold other producers' malformed records (a bad Confluent magic byte, a
  schema id the registry does not know): they are skipped and counted, never raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from edgeloop.core.errors import DecodeError

T = TypeVar("T")

# One fetch wait. Two empty polls in a row past the reported end offsets end the read.
POLL_MS = 1000
EMPTY_POLLS_PAST_END = 2
MAX_RECORDS = 5000
# Metadata refreshes (METADATA_BACKOFF_S apart) before a topic is taken to be missing.
METADATA_ATTEMPTS = 3
METADATA_BACKOFF_S = 0.25


@dataclass
class TopicRead(Generic[T]):
    """What `read_topic` read.

    `records` are in offset order within each partition, partition by partition.
    `complete` is False when the deadline passed before every partition was read to its
    end: the records are then a prefix, and a caller must say so rather than report them
    as the topic's content. `partitions` is 0 when the topic does not exist.
    """

    records: list[T] = field(default_factory=list)
    undecodable: int = 0
    complete: bool = False
    partitions: int = 0


async def read_topic(
    bootstrap: str,
    topic: str,
    decode: Callable[[bytes], Awaitable[T]],
    *,
    tail: int | None = None,
    timeout_s: float = 60.0,
) -> TopicRead[T]:
    """Read `topic` from its start (or its last `tail` records per partition) to its end.

    The end is the end offsets taken at the start of the read; past them the read goes on
    until two polls in a row come back empty, because Tansu 0.6 reports an end below
    offsets it serves (multi-record batches). Empty polls before a partition reached its
    reported end do not count: a first fetch from freshly assigned partitions can come
    back empty for seconds on a loaded machine. `timeout_s` bounds the whole read
    (metadata, offsets, fetches, decoding); it is a ceiling, not a wait: a read that
    reaches the end returns at once.

    A topic that does not exist (absent from the broker's metadata after
    METADATA_ATTEMPTS refreshes, about half a second) reads as empty and complete, with
    `partitions == 0`: for `control status` on a cluster no control plane has written to
    yet, "nothing yet" is the truth. Empty records (compaction tombstones) are skipped
    and not counted.

    Args:
        bootstrap: the Kafka bootstrap servers.
        topic: the topic to read.
        decode: turns a record value into a T; a `DecodeError` skips the record and is
            counted in `undecodable` (foreign bytes on a shared topic). Anything else it
            raises (e.g. a retriable RegistryError: the registry cannot be reached)
            ends the read and is raised.
        tail: read only the last `tail` records of each partition (by the end offsets
            taken at the start); None reads every record.
        timeout_s: the longest the whole read may take.

    Returns:
        The decoded records, the count of undecodable ones, and whether every partition
        was read to its end before the deadline.

    Raises:
        KafkaError: the broker is unreachable.
        Whatever `decode` raises, except DecodeError.
    """
    out: TopicRead[T] = TopicRead()
    per_partition: dict[int, list[T]] = {}
    # Right after assign(), aiokafka's fetcher resets every partition without a position
    # in the background, by auto_offset_reset. With the default ("latest") and a
    # seek_to_beginning() (a reset too), that background answer could land after it and
    # set the position to the END: the partition's records were never read (the demo
    # lineage's missing TrainingTrigger on Apache Kafka: 1 read of a just-written topic in
    # 12 here). So `_seek` seeks to explicit offsets (a late reset answer is ignored once
    # a partition has a position), and any reset, also an out-of-range one mid-read when
    # retention deletes the start, goes to the earliest offset, never skipping records.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    deadline = asyncio.get_running_loop().time() + timeout_s
    scope = asyncio.timeout_at(deadline)
    try:
        # Inside the try: a start that fails (broker down) must still close the client.
        await consumer.start()
        async with scope:
            await _read(consumer, topic, decode, tail=tail, out=out, per_partition=per_partition)
        out.complete = True
    except TimeoutError:
        if not scope.expired():
            raise  # someone else's timeout, not the deadline of this read
        # The deadline passed: `records` is what was read so far, `complete` stays False.
    finally:
        await consumer.stop()
    for p in sorted(per_partition):
        rows = per_partition[p]
        out.records.extend(rows if tail is None else rows[-tail:] if tail > 0 else [])
    return out


async def _read(
    consumer: AIOKafkaConsumer,
    topic: str,
    decode: Callable[[bytes], Awaitable[T]],
    *,
    tail: int | None,
    out: TopicRead[T],
    per_partition: dict[int, list[T]],
) -> None:
    ends = await _seek(consumer, topic, tail=tail, out=out, per_partition=per_partition)
    if not ends:
        return  # no such topic, every partition empty, or tail=0: nothing to wait for
    pending = set(ends)
    empty_past_end = 0
    while pending or empty_past_end < EMPTY_POLLS_PAST_END:
        batches = await consumer.getmany(timeout_ms=POLL_MS, max_records=MAX_RECORDS)
        got = False
        for tp, records in batches.items():
            got = got or bool(records)
            rows = per_partition[tp.partition]
            for rec in records:
                if not rec.value:
                    continue  # a tombstone: a deleted key, not a record
                try:
                    rows.append(await decode(rec.value))
                except DecodeError:
                    out.undecodable += 1  # foreign bytes: skipped, counted, reported
        # Done with a partition once its position reaches the reported end, not when the
        # last record's offset does: compaction and transaction markers leave gaps. Its
        # position is known here (seeked in `_seek`), so position() does not wait.
        for tp in list(pending):
            if await consumer.position(tp) >= ends[tp]:
                pending.discard(tp)
        # Only past the end do empty polls count: before it, an empty first fetch is the
        # broker being slow, not the partition being read.
        if not pending:
            empty_past_end = 0 if got else empty_past_end + 1


async def _seek(
    consumer: AIOKafkaConsumer,
    topic: str,
    *,
    tail: int | None,
    out: TopicRead[T],
    per_partition: dict[int, list[T]],
) -> dict[TopicPartition, int]:
    """Assign every partition of `topic` and seek to where the read starts.

    Returns:
        The reported end offset of each partition with something to read.
    """
    # After start, aiokafka's metadata cache holds what its bootstrap asked for (an empty
    # topic list: Apache Kafka answers with no topics), so refresh. A topic whose leaders
    # are not elected yet comes back with LEADER_NOT_AVAILABLE and aiokafka leaves it out
    # of the cache, as if absent: ask a few times before calling the topic missing.
    parts = consumer.partitions_for_topic(topic)
    for attempt in range(METADATA_ATTEMPTS):
        if parts:
            break
        if attempt:
            await asyncio.sleep(METADATA_BACKOFF_S)
        await consumer._client.force_metadata_update()  # aiokafka: no public refresh
        parts = consumer.partitions_for_topic(topic)
    if not parts:
        return {}  # no such topic: empty and complete (see read_topic)
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    out.partitions = len(tps)
    consumer.assign(tps)
    starts = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)
    to_read: dict[TopicPartition, int] = {}
    for tp in tps:
        per_partition[tp.partition] = []
        first = starts[tp] if tail is None else max(starts[tp], ends[tp] - max(tail, 0))
        consumer.seek(tp, first)
        if ends[tp] > first:
            to_read[tp] = ends[tp]
    return to_read

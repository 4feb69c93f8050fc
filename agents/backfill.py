"""Read the records of a hole (`agents/offset_ledger.py`) straight from the broker.

A plain aiokafka consumer of no group, assigned the one partition and sought to the hole's
start before anything else is awaited (a seek before the first await wins over aiokafka's
background offset reset, see schemas/topic_reader.py). It shares nothing with Faust's
consumer, so Faust's read offsets, gaps and queues cannot drop what it reads.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition

from edgeloop.agents.offset_ledger import Hole
from edgeloop.agents.records import Raw
from edgeloop.core.errors import EdgeloopError


class HoleReadError(EdgeloopError):
    """The records of a hole could not be read in time (the broker is slow or down)."""

    retriable = True


class HoleUnreadableError(EdgeloopError):
    """The broker answers but serves nothing at the hole's next offset, below its high
    watermark (seen on Tansu 0.6): waiting longer would stop the stage for good.

    `records` holds what was read before that offset, `position` the offset."""

    retriable = False

    def __init__(self, message: str, *, records: list[Raw], position: int) -> None:
        super().__init__(message)
        self.records = records
        self.position = position


# Empty fetches in a row, with the broker answering and the high watermark above the read
# position, after which the offset is taken as unservable (500 ms each).
STUCK_POLLS = 10


async def read_hole(
    bootstrap: str, hole: Hole, *, timeout_s: float = 30.0, max_bytes: int = 1 << 20
) -> list[Raw]:
    """The records at offsets [hole.start, hole.end) of the hole's partition, in order.

    Offsets that do not exist (compaction, transaction markers, retention before the
    log start, offsets at or past the partition's high watermark) are simply absent from
    the result: the read ends when it reaches `hole.end` or the high watermark.

    Args:
        bootstrap: the Kafka bootstrap servers, host:port[,host:port...].
        hole: the partition and the offsets to read.
        timeout_s: seconds for the whole read, connecting included.
        max_bytes: the largest record expected (the agents' `max_message_bytes`).

    Raises:
        HoleReadError: the broker did not answer within `timeout_s` (retriable).
        HoleUnreadableError: the broker answered but served nothing at the read position,
            below its high watermark, for `STUCK_POLLS` fetches.
    """
    tp = TopicPartition(hole.topic, hole.partition)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="edgeloop-agents-backfill",
        max_partition_fetch_bytes=max(max_bytes, 1 << 20),
    )
    out: list[Raw] = []
    try:
        async with asyncio.timeout(timeout_s):
            await consumer.start()
            consumer.assign([tp])
            consumer.seek(tp, hole.start)
            stuck = 0
            while (position := await consumer.position(tp)) < hole.end:
                batches = await consumer.getmany(tp, timeout_ms=500)
                records = batches.get(tp, [])
                for rec in records:
                    if hole.start <= rec.offset < hole.end:
                        out.append(
                            Raw(rec.value or b"", rec.key, rec.topic, rec.partition, rec.offset)
                        )
                if records:
                    stuck = 0
                    continue
                high = consumer.highwater(tp)  # None until the broker answered a fetch
                if high is None:
                    continue
                if high <= position:
                    break  # the rest of the hole does not exist (yet): nothing to hand over
                stuck += 1
                if stuck >= STUCK_POLLS:
                    raise HoleUnreadableError(
                        f"{hole.topic}/{hole.partition}: the broker serves nothing at offset "
                        f"{position} below its high watermark {high} ({len(out)} read)",
                        records=out,
                        position=position,
                    )
    except TimeoutError as exc:
        raise HoleReadError(
            f"could not read {hole.topic}/{hole.partition} offsets "
            f"{hole.start}..{hole.end - 1} within {timeout_s:g} s ({len(out)} read)"
        ) from exc
    finally:
        await consumer.stop()
    return out

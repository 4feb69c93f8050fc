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


async def read_hole(
    bootstrap: str, hole: Hole, *, timeout_s: float = 30.0, max_bytes: int = 1 << 20
) -> list[Raw]:
    """The records at offsets [hole.start, hole.end) of the hole's partition, in order.

    Offsets that do not exist (compaction, transaction markers, retention before the
    log start) are simply absent from the result.

    Args:
        bootstrap: the Kafka bootstrap servers, host:port[,host:port...].
        hole: the partition and the offsets to read.
        timeout_s: seconds for the whole read, connecting included.
        max_bytes: the largest record expected (the agents' `max_message_bytes`).

    Raises:
        HoleReadError: the read did not reach `hole.end` within `timeout_s`.
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
            while await consumer.position(tp) < hole.end:
                batches = await consumer.getmany(tp, timeout_ms=500)
                for rec in batches.get(tp, []):
                    if hole.start <= rec.offset < hole.end:
                        out.append(
                            Raw(rec.value or b"", rec.key, rec.topic, rec.partition, rec.offset)
                        )
    except TimeoutError as exc:
        raise HoleReadError(
            f"could not read {hole.topic}/{hole.partition} offsets "
            f"{hole.start}..{hole.end - 1} within {timeout_s:g} s ({len(out)} read)"
        ) from exc
    finally:
        await consumer.stop()
    return out

"""The worker's lean Faust parts (agents/lean_faust.py) against Faust's own: each decodes,
measures and delivers exactly what Faust's would, only without the per-event overhead."""

from __future__ import annotations

from typing import Any

import faust
import pytest
from faust.transport.producer import ProducerBuffer
from faust.types import TP, Message

from edgeloop.agents.lean_faust import LeanProducer, RawSchema


def _message(key: bytes | None, value: bytes | None) -> Message:
    return Message(
        topic="edge.inference.v1", partition=3, offset=41, timestamp=1.0,
        timestamp_type=0, headers=[("traceparent", b"00-ab-cd-01")], key=key, value=value,
        checksum=None, tp=TP("edge.inference.v1", 3),
    )  # fmt: skip


@pytest.fixture
def app() -> Any:
    return faust.App("lean-faust-test", broker="kafka://127.0.0.1:9", autodiscover=False)


# Confluent-framed bytes, a zero-length value, a tombstone, a record without a key.
RECORDS = [
    (b"dev-001", b"\x00\x00\x00\x00\x07\x02abc"),
    (b"dev-002", b""),
    (b"dev-003", None),
    (None, b"\x00\x00\x00\x00\x07\xff"),
]


@pytest.mark.parametrize(("key", "value"), RECORDS)
async def test_raw_schema_decodes_what_fausts_raw_codec_decodes(
    app: Any, key: bytes | None, value: bytes | None
) -> None:
    faust_own = faust.Schema(
        key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    message = _message(key, value)
    ours = await RawSchema().decode(app, message, propagate=True)
    theirs = await faust_own.decode(app, _message(key, value), propagate=True)
    assert (ours.key, ours.value) == (theirs.key, theirs.value) == (key, value)
    assert type(ours) is type(theirs)
    assert ours.headers == theirs.headers == {"traceparent": b"00-ab-cd-01"}
    assert ours.message is message
    assert ours.app is app


async def test_the_lean_producer_buffer_counts_pending_messages_as_fausts_does(app: Any) -> None:
    app.transport.Producer = LeanProducer
    producer = app.producer
    assert isinstance(producer, LeanProducer)
    buffer = producer.buffer
    assert buffer.size == 0
    for n in range(3):
        buffer.pending.put_nowait(n)  # what `ProducerBuffer.put` queues for a table write
    faust_size = ProducerBuffer.size.fget(buffer)  # Faust's own property
    assert buffer.size == faust_size == 3

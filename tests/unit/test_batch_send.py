"""What the worker sends again when some of a batch's record batches failed
(agents/batch_send.py `to_resend`): in each partition everything from its first failed
batch on, so nothing is lost and a partition's order holds."""

from __future__ import annotations

from typing import Any

from aiokafka.errors import KafkaTimeoutError

from edgeloop.agents.batch_send import Sent, to_resend
from edgeloop.agents.records import Out


def _sent(topic: str, partition: int | None, *values: bytes) -> Sent:
    return Sent(topic, partition, [Out(topic, b"k", v) for v in values], future=None)  # type: ignore[arg-type]


def _values(outs: list[Out]) -> list[bytes]:
    return [o.value for o in outs]


def test_all_acknowledged_means_nothing_to_send_again() -> None:
    sent = [_sent("t", 0, b"a"), _sent("t", 1, b"b")]
    assert to_resend(sent, [object(), object()]) == []


def test_a_failed_batch_and_every_later_one_of_its_partition_are_sent_again() -> None:
    sent = [
        _sent("t", 0, b"p0-a", b"p0-b"),
        _sent("t", 0, b"p0-c"),  # fails
        _sent("t", 1, b"p1-a"),
        _sent("t", 0, b"p0-d"),  # acknowledged, but after the failed one: again, for order
        _sent("u", 0, b"u0-a"),  # same partition number, another topic: untouched
    ]
    ok: Any = object()
    results = [ok, KafkaTimeoutError(), ok, ok, ok]
    assert _values(to_resend(sent, results)) == [b"p0-c", b"p0-d"]


def test_an_unkeyed_record_that_failed_is_sent_again_alone() -> None:
    sent = [_sent("t", None, b"dlq-1"), _sent("t", None, b"dlq-2"), _sent("t", 2, b"k")]
    results: list[Any] = [KafkaTimeoutError(), object(), object()]
    assert _values(to_resend(sent, results)) == [b"dlq-1"]

"""What the worker sends again when some of a batch's record batches failed
(agents/batch_send.py `to_resend`): in each partition everything from its first failed
batch on, so nothing is lost and a partition's order holds; and `Context.produce`, which
sends those again until every output is acknowledged."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiokafka.errors import KafkaTimeoutError

from edgeloop.agents.batch_send import Sent, to_resend
from edgeloop.agents.context import Context
from edgeloop.agents.metrics import AgentMetrics
from edgeloop.agents.records import Out
from edgeloop.agents.settings import AgentsSettings
from edgeloop.core.settings import KafkaSettings, RegistrySettings


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


class _Producer:
    """Stands for Faust's aiokafka producer: only its identity is used here."""


class _FlakySender:
    """A batch sender that puts each output in a record batch of its own, all in
    partition 0; the one holding b"c" fails once."""

    def __init__(self, producer: _Producer) -> None:
        self.producer = producer
        self.calls: list[list[bytes]] = []
        self.failed = False

    async def send(self, outputs: list[Out]) -> list[Sent]:
        self.calls.append(_values(outputs))
        loop = asyncio.get_running_loop()
        sent = []
        for out in outputs:
            future = loop.create_future()
            if out.value == b"c" and not self.failed:
                self.failed = True
                future.set_exception(KafkaTimeoutError())
            else:
                future.set_result(None)
            sent.append(Sent("t", 0, [out], future))
        return sent


async def test_produce_sends_again_from_the_failed_batch_and_returns_once_all_are_acked() -> None:
    """`Context.produce` around `to_resend`: the batch that failed and the later ones of its
    partition go again, the acknowledged earlier ones do not, and the retry is counted."""
    producer = _Producer()
    app = SimpleNamespace(producer=SimpleNamespace(_ensure_producer=lambda: producer))
    metrics = AgentMetrics()
    ctx = Context(AgentsSettings(), KafkaSettings(), RegistrySettings(), metrics, app=app)
    sender = _FlakySender(producer)
    ctx._sender = sender  # type: ignore[assignment]
    outs = [Out("t", b"k", v) for v in (b"a", b"b", b"c", b"d", b"e")]
    await asyncio.wait_for(ctx.produce(outs), 10)
    # b"d" and b"e" were acknowledged after the failed b"c": sent again, for the order.
    assert sender.calls == [[b"a", b"b", b"c", b"d", b"e"], [b"c", b"d", b"e"]]
    assert metrics.retries.labels("kafka")._value.get() == 1

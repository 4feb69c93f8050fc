"""Faust per-event bookkeeping the worker does not use, left out of its hot path.

Measured with py-spy on a worker draining a backlog (`edgeloop bench agents`), Faust
0.15.3 spends, for every event, besides delivering it:

- about 2% in the conductor's `wait_until_producer_ebb`, whose `ProducerBuffer.size`
  reads the `producer_threaded` setting through Faust's settings registry on every call;
- about 2.5% in the channel's key and value `loads`: the serializer registry's lookup of
  the `raw` codec, which hands the broker's bytes back as they came;
- about 2% in `App.create_event`, which reads the `Event` class through the settings
  registry for every event.

`LeanProducer`'s buffer answers `size` from its queue directly; `RawSchema` hands a
record's key and value on as the broker delivered them, in an event of the app's `Event`
class read once. None changes what is delivered, acknowledged or committed: the buffer's
size is the same number, the `raw` codec's `loads` of bytes is the bytes, and the event
is built by the same class from the same arguments.

Faust's per-event `Monitor` sensor (about 3.5% of the CPU) stays: its consumer's livelock
detector reads the Monitor's per-partition `stream_inbound_time`, and without it logs
"Stream has not started processing" for every lagging partition and skips its commit
checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faust
from faust.serializers.schemas import DecodeFunction
from faust.transport.drivers.aiokafka import Producer
from faust.transport.producer import ProducerBuffer
from faust.types import AppT, Message


class RawSchema(faust.Schema[bytes, bytes]):
    """A topic's schema for records whose key and value stay bytes (the Confluent wire
    format our own codec decodes, agents/codec.py): Faust's `raw` codec without the
    serializer registry's per-record lookup. A missing key or value (a tombstone) stays
    None, as the `raw` codec leaves it."""

    def __init__(self) -> None:
        super().__init__(
            key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
        )

    def loads_key(
        self,
        app: AppT,
        message: Message,
        *,
        loads: Callable[..., Any] | None = None,
        serializer: Any = None,
    ) -> Any:
        return message.key

    def loads_value(
        self,
        app: AppT,
        message: Message,
        *,
        loads: Callable[..., Any] | None = None,
        serializer: Any = None,
    ) -> Any:
        return message.value

    def compile(
        self,
        app: AppT,
        *,
        on_key_decode_error: Any = None,
        on_value_decode_error: Any = None,
        default_propagate: bool = False,
    ) -> DecodeFunction:
        """The channel's per-message decoder: `Schema.compile`'s, less what cannot happen
        for bytes (a key or value decode error) and less the per-event settings lookup
        of `App.create_event`. Events are the app's `Event` class, as Faust makes them."""
        app.finalize()  # as Faust's compile does (through `app.serializers`)
        event_type: Any = app.conf.Event

        async def decode(message: Message, *, propagate: bool = default_propagate) -> Any:
            return event_type(app, message.key, message.value, message.headers, message)

        return decode


class _PendingSizeBuffer(ProducerBuffer):
    """Faust's producer buffer, unthreaded; `size` without a settings lookup."""

    @property
    def size(self) -> int:
        # The same deque Faust's property measures (a CPython detail typeshed omits).
        return len(self.pending._queue)  # type: ignore[attr-defined]


class LeanProducer(Producer):
    """Faust's aiokafka producer with `_PendingSizeBuffer` (threaded producers keep
    Faust's own buffer, whose size reads the thread's queue)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.app.conf.producer_threaded:
            buffer = _PendingSizeBuffer(loop=self.loop, beacon=self.beacon)
            buffer.app = self.app
            self.buffer = buffer

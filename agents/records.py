"""What the agents' step functions take and give: raw Kafka records in, records to produce
out, and a tally for the metrics. Plain data, no Faust."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Raw:
    """One consumed message."""

    value: bytes
    key: bytes | None
    topic: str
    partition: int
    offset: int

    @property
    def source(self) -> str:
        """Where the bytes came from, as a DeadLetter's `source` names it."""
        return f"kafka:{self.topic}/{self.partition}/{self.offset}"


@dataclass(frozen=True, slots=True)
class Out:
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes


@dataclass(slots=True)
class StepResult:
    """The records a step produced and what happened, for the metrics.

    `tally` keys: `in`, `out:<topic>`, `duplicate`, `out_of_window`, `dlq:<reason>`,
    `enrich:<source>`, `hard:<reason>`, `suppressed:<why>`.
    """

    outputs: list[Out] = field(default_factory=list)
    tally: Counter[str] = field(default_factory=Counter)

    def emit(self, out: Out) -> None:
        self.outputs.append(out)
        self.tally[f"out:{out.topic}"] += 1


class Observer(Protocol):
    """Collects the control plane's observations of one batch's source records and
    hands them back as records to produce with the batch's outputs."""

    def add(self, schema_name: str, rec: Mapping[str, Any], raw: Raw) -> None:
        """Observe one decoded source record (one the control plane does not use adds
        nothing; a malformed one is counted, never raised)."""

    def records(self) -> list[Out]:
        """The observations so far as control-log records."""

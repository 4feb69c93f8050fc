"""Valid example records for any schema: for tests, benchmarks and `schemas` docs.

Deterministic for a seed, so a failing round trip can be reproduced.
"""

from __future__ import annotations

import random
from typing import Any

from edgeloop.schemas.bounded import _Names
from edgeloop.schemas.catalog import EventSchema


def example_record(
    schema: EventSchema, seed: int = 0, *, items: int = 10, blob: int = 64
) -> dict[str, Any]:
    """A record of `schema` with `items` entries per array/map and `blob`-byte bytes fields.

    Floats are exactly representable in float32, so a round trip compares equal.
    """
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    names = _Names(schema.schema)

    def make(node: Any, depth: int) -> Any:  # noqa: PLR0911 - one return per Avro type
        node = names.resolve(node)
        if isinstance(node, list):  # prefer the non-null branch so fields are exercised
            branches = [b for b in node if b != "null"] or node
            return make(branches[0], depth + 1) if depth < 8 else None
        if isinstance(node, str):
            return _primitive(node, rng, blob)
        kind = node["type"]
        if kind in ("record", "error"):
            return {f["name"]: make(f["type"], depth + 1) for f in node["fields"]}
        if kind == "enum":
            return node["symbols"][
                rng.randrange(1, len(node["symbols"])) if len(node["symbols"]) > 1 else 0
            ]
        if kind == "fixed":
            return rng.randbytes(int(node["size"]))
        if kind == "array":
            return [make(node["items"], depth + 1) for _ in range(items)]
        if kind == "map":
            return {f"k{i}": make(node["values"], depth + 1) for i in range(items)}
        raise ValueError(f"unsupported type {kind!r}")

    record = make(schema.schema, 0)
    assert isinstance(record, dict)
    return record


def _primitive(kind: str, rng: random.Random, blob: int) -> Any:  # noqa: PLR0911
    if kind == "null":
        return None
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randrange(0, 10_000)
    if kind == "long":
        return 1_700_000_000_000_000 + rng.randrange(0, 10**9)
    if kind in ("float", "double"):
        return rng.randrange(0, 1024) / 1024  # exact in float32
    if kind == "bytes":
        return rng.randbytes(blob)
    return f"value-{rng.randrange(0, 10**6)}"

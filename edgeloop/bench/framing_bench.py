"""Cost of framing per event type, next to plain fastavro and orjson on the same records.

Targets (issue: foundation): framing adds under 10% to fastavro's own cost; each framed
encode and decode takes at most 10 us on the benchmark machine.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson
from fastavro import schemaless_reader, schemaless_writer

from edgeloop.bench.report import per_call_us
from edgeloop.schemas import catalog
from edgeloop.schemas.framing import ConfluentCodec, SingleObjectCodec
from edgeloop.schemas.samples import example_record

MAX_OVERHEAD = 0.10
MAX_US = 10.0


def _orjson_default(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError


def _fastavro_decode(parsed: Any, body: bytes) -> object:
    return schemaless_reader(io.BytesIO(body), parsed, None)


def run(quick: bool = False) -> dict[str, Any]:
    iterations, rounds = (1_000, 5) if quick else (3_000, 9)
    schemas = sorted(catalog.catalog().values(), key=lambda s: s.short_name)
    single = SingleObjectCodec(schemas)
    confluent = ConfluentCodec()
    rows = []
    for schema_id, schema in enumerate(schemas, start=1):
        confluent.add(schema_id, schema)
        record = example_record(schema, seed=schema_id)
        framed = single.encode(schema, record)
        wire = confluent.encode(schema_id, schema, record)
        body = framed[10:]
        as_json = orjson.dumps(record, default=_orjson_default)
        parsed = schema.parsed

        def fa_encode(parsed: Any = parsed, record: Any = record) -> bytes:
            buf = io.BytesIO()
            schemaless_writer(buf, parsed, record)
            return buf.getvalue()

        # Interleave candidates and baselines so machine noise hits both alike.
        costs: dict[str, list[float]] = {}
        candidates: dict[str, Callable[[], object]] = {
            "fastavro_encode": fa_encode,
            "single_encode": partial(single.encode, schema, record),
            "confluent_encode": partial(confluent.encode, schema_id, schema, record),
            "fastavro_decode": partial(_fastavro_decode, parsed, body),
            "single_decode": partial(single.decode, framed),
            "confluent_decode": partial(confluent.decode, wire),
            "orjson_encode": partial(orjson.dumps, record, default=_orjson_default),
            "orjson_decode": partial(orjson.loads, as_json),
        }
        for _ in range(3):
            for key, fn in candidates.items():
                costs.setdefault(key, []).append(
                    per_call_us(fn, iterations=iterations, rounds=rounds)
                )
        us = {k: min(v) for k, v in costs.items()}
        row: dict[str, Any] = {"event": schema.short_name, "bytes": len(framed), **us}
        for op in ("encode", "decode"):
            for framing in ("single", "confluent"):
                row[f"{framing}_{op}_overhead"] = us[f"{framing}_{op}"] / us[f"fastavro_{op}"] - 1
        rows.append(row)

    worst_overhead = max(
        r[f"{f}_{op}_overhead"]
        for r in rows
        for f in ("single", "confluent")
        for op in ("encode", "decode")
    )
    worst_us = max(
        r[f"{f}_{op}"] for r in rows for f in ("single", "confluent") for op in ("encode", "decode")
    )
    return {
        "name": "framing",
        "title": "framing (us per call; overheads vs fastavro as fractions)",
        "rows": rows,
        "summary": {
            "worst_overhead_vs_fastavro": worst_overhead,
            "worst_framed_us": worst_us,
            "target_overhead": MAX_OVERHEAD,
            "target_us": MAX_US,
            "overhead_met": worst_overhead < MAX_OVERHEAD,
            "latency_met": worst_us <= MAX_US,
        },
        "columns": [
            "event",
            "bytes",
            "fastavro_encode",
            "single_encode",
            "confluent_encode",
            "fastavro_decode",
            "single_decode",
            "confluent_decode",
            "orjson_encode",
            "orjson_decode",
            "single_decode_overhead",
        ],
        "labels": {
            "fastavro_encode": "fastavro enc",
            "single_encode": "1-obj enc",
            "confluent_encode": "confl enc",
            "fastavro_decode": "fastavro dec",
            "single_decode": "1-obj dec",
            "confluent_decode": "confl dec",
            "orjson_encode": "orjson enc",
            "orjson_decode": "orjson dec",
            "single_decode_overhead": "1-obj dec overhead",
        },
    }

"""Strict decoding: every value the Avro specification forbids is rejected with a reason.

Each hostile body below is one that fastavro 1.13 decodes without complaint (asserted
next to it, so the fault stays documented) or that it rejects without a reason; the
codecs must reject all of them, with the dead-letter reason the bridge records. Valid
bodies decode to exactly what fastavro builds.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from typing import Any

import fastavro
import pytest

from edgeloop.core.errors import DecodeError
from edgeloop.schemas import catalog
from edgeloop.schemas.bounded import MAX_TIMESTAMP_US, DecodeLimits
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.framing import ConfluentCodec, SingleObjectCodec
from edgeloop.schemas.samples import example_record
from tests.unit.test_framing import zigzag

EVENTS = sorted(catalog.catalog().values(), key=lambda s: s.name)
INFERENCE = catalog.get("InferenceEvent")


def schema_of(*types: Any) -> EventSchema:
    return EventSchema(
        {
            "type": "record",
            "name": "R",
            "namespace": "test",
            "fields": [{"name": f"f{i}", "type": t} for i, t in enumerate(types)],
        }
    )


def fastavro_reads(schema: EventSchema, body: bytes) -> bool:
    """Whether fastavro (logical types off, as the codecs ran it) accepts the whole body."""
    stream = io.BytesIO(body)
    try:
        fastavro.schemaless_reader(stream, schema.parsed, None)
    except Exception:
        return False
    return stream.tell() == len(body)


def decode_body(schema: EventSchema, body: bytes, limits: DecodeLimits | None = None) -> Any:
    codec = SingleObjectCodec([schema], limits)
    return codec.decode(b"\xc3\x01" + schema.fingerprint + body)[1]


ENUM = {"type": "enum", "name": "E", "symbols": ["UNKNOWN", "A", "B", "C"]}
ARRAY_INT = {"type": "array", "items": "int"}
MAP_INT = {"type": "map", "values": "int"}
TS = {"type": "long", "logicalType": "timestamp-micros"}
TS_MS = {"type": "long", "logicalType": "timestamp-millis"}

# (case, field types, body, reason, fastavro accepts it?)
HOSTILE: list[tuple[str, tuple[Any, ...], bytes, str, bool]] = [
    ("enum index -1", (ENUM,), zigzag(-1), "bad_enum_index", True),
    ("enum index -4", (ENUM,), zigzag(-4), "bad_enum_index", True),
    ("enum index -5", (ENUM,), zigzag(-5), "bad_enum_index", False),
    ("enum index past the end", (ENUM,), zigzag(4), "bad_enum_index", False),
    ("union branch -1", (["null", "int"],), zigzag(-1) + zigzag(5), "bad_union_index", True),
    ("union branch past the end", (["null", "int"],), zigzag(2), "bad_union_index", False),
    ("boolean byte 2", ("boolean",), b"\x02", "bad_boolean", True),
    ("int beyond 32 bits", ("int",), zigzag(2**31), "bad_int", True),
    ("int varint of 6 bytes", ("int",), b"\x80\x80\x80\x80\x80\x00", "bad_varint", True),
    ("long varint of 11 bytes", ("long",), b"\x80" * 10 + b"\x01", "bad_varint", True),
    ("long beyond 64 bits", ("long",), b"\xff" * 9 + b"\x7f", "bad_long", True),
    ("negative string length", ("string",), zigzag(-2) + b"abc", "bad_length", False),
    ("negative bytes length", ("bytes",), zigzag(-1) + b"abc", "bad_length", False),
    ("string longer than the body", ("string",), zigzag(10) + b"abc", "truncated", False),
    ("string not UTF-8", ("string",), zigzag(2) + b"\xff\xfe", "bad_utf8", False),
    ("string with a surrogate", ("string",), zigzag(3) + b"\xed\xa0\x80", "bad_utf8", False),
    (
        "map key not UTF-8",
        (MAP_INT,),
        zigzag(1) + zigzag(1) + b"\xff" + zigzag(1) + zigzag(0),
        "bad_utf8",
        False,
    ),
    (
        "negative block size",
        (ARRAY_INT,),
        zigzag(-2) + zigzag(-5) + zigzag(1) + zigzag(2) + zigzag(0),
        "bad_length",
        True,
    ),
    (
        "block size not the block's",
        (ARRAY_INT,),
        zigzag(-2) + zigzag(7) + zigzag(1) + zigzag(2) + zigzag(0),
        "bad_block_size",
        True,
    ),
    (
        "map block size not the block's",
        (MAP_INT,),
        zigzag(-1) + zigzag(9) + zigzag(1) + b"k" + zigzag(1) + zigzag(0),
        "bad_block_size",
        True,
    ),
    ("array claiming more than it holds", (ARRAY_INT,), zigzag(5) + zigzag(1), "truncated", False),
    ("truncated float", ("float",), b"\x00\x00", "truncated", False),
    ("truncated fixed", ({"type": "fixed", "name": "F", "size": 4},), b"ab", "truncated", False),
    ("trailing bytes", ("int",), zigzag(1) + b"\x00", "trailing_bytes", False),
    ("timestamp 2^62 us", (TS,), zigzag(2**62), "bad_timestamp", True),
    ("timestamp after year 9999", (TS,), zigzag(MAX_TIMESTAMP_US + 1), "bad_timestamp", True),
    ("timestamp before 1970", (TS,), zigzag(-1), "bad_timestamp", True),
    ("timestamp-millis 2^62", (TS_MS,), zigzag(2**62), "bad_timestamp", True),
    ("timestamp in a union", (["null", TS],), zigzag(1) + zigzag(2**62), "bad_timestamp", True),
]


@pytest.mark.parametrize(
    ("case", "types", "body", "reason", "fastavro_accepts"),
    HOSTILE,
    ids=[c[0] for c in HOSTILE],
)
def test_forbidden_values_are_rejected_with_their_reason(
    case: str, types: tuple[Any, ...], body: bytes, reason: str, fastavro_accepts: bool
) -> None:
    schema = schema_of(*types)
    assert fastavro_reads(schema, body) is fastavro_accepts
    with pytest.raises(DecodeError) as err:
        decode_body(schema, body)
    assert err.value.reason == reason, str(err.value)
    assert err.value.path is not None and err.value.path.startswith("R"), str(err.value)


def _mutate(field: str, value: Any, other: Any, new: bytes) -> bytes:
    """An InferenceEvent whose `field` bytes are replaced by `new` (found by diffing)."""
    record = example_record(INFERENCE, seed=1)
    one = SingleObjectCodec([INFERENCE]).encode(INFERENCE, {**record, field: value})
    two = SingleObjectCodec([INFERENCE]).encode(INFERENCE, {**record, field: other})
    at = next(i for i, (a, b) in enumerate(zip(one, two, strict=True)) if a != b)
    return one[:at] + new + one[at + 1 :]


def test_the_issues_enum_index_minus_one_is_dead_lettered_not_read_as_entropy() -> None:
    # zig-zag -1 for confidence_kind: fastavro reads ENTROPY (Python's symbols[-1]).
    data = _mutate("confidence_kind", "UNKNOWN", "MAX_PROB", zigzag(-1))
    assert (
        fastavro.schemaless_reader(io.BytesIO(data[10:]), INFERENCE.parsed, None)["confidence_kind"]
        == "ENTROPY"
    )
    with pytest.raises(DecodeError) as err:
        SingleObjectCodec([INFERENCE]).decode(data)
    assert err.value.reason == "bad_enum_index"
    assert err.value.path == "InferenceEvent.confidence_kind"


def test_the_issues_timestamp_of_2_to_the_62_is_rejected() -> None:
    record = {**example_record(INFERENCE, seed=2), "ts": 2**62}
    single = SingleObjectCodec([INFERENCE])
    data = single.encode(INFERENCE, record)
    with pytest.raises(DecodeError) as err:
        single.decode(data)
    assert (err.value.reason, err.value.path) == ("bad_timestamp", "InferenceEvent.ts")
    # Why: a reader with logical types (fastavro, hence confluent-kafka's
    # AvroDeserializer) builds a datetime and raises on every such record.
    with pytest.raises((OverflowError, ValueError)):
        fastavro.schemaless_reader(
            io.BytesIO(data[10:]), fastavro.parse_schema(INFERENCE.schema), None
        )
    # The Confluent framing (what Kafka consumers decode) rejects it the same way.
    confluent = ConfluentCodec()
    confluent.add(7, INFERENCE)
    with pytest.raises(DecodeError) as err:
        confluent.decode(confluent.encode(7, INFERENCE, record))
    assert err.value.reason == "bad_timestamp"


def test_the_timestamp_window_is_configurable_and_inclusive() -> None:
    schema = schema_of(TS, TS_MS)
    assert decode_body(schema, zigzag(0) + zigzag(MAX_TIMESTAMP_US // 1000)) == {
        "f0": 0,
        "f1": MAX_TIMESTAMP_US // 1000,
    }
    assert decode_body(schema, zigzag(MAX_TIMESTAMP_US) + zigzag(0))["f0"] == MAX_TIMESTAMP_US
    narrow = DecodeLimits(min_timestamp_us=1_600_000_000_000_000, max_timestamp_us=2**60)
    with pytest.raises(DecodeError) as err:
        decode_body(schema, zigzag(1_500_000_000_000_000) + zigzag(1_700_000_000_000), narrow)
    assert (err.value.reason, err.value.path) == ("bad_timestamp", "R.f0")
    with pytest.raises(DecodeError) as err:
        decode_body(schema, zigzag(1_700_000_000_000_000) + zigzag(1_500_000_000_000), narrow)
    assert (err.value.reason, err.value.path) == ("bad_timestamp", "R.f1")


RECURSIVE = EventSchema(
    {
        "type": "record",
        "name": "Node",
        "namespace": "test",
        "fields": [
            {"name": "value", "type": "long"},
            {"name": "next", "type": ["null", "Node"], "default": None},
        ],
    }
)


def test_recursion_decodes_and_a_deep_body_is_refused() -> None:
    body = zigzag(1) + zigzag(1) + zigzag(2) + zigzag(0)
    assert decode_body(RECURSIVE, body) == {"value": 1, "next": {"value": 2, "next": None}}
    deep = (zigzag(1) + zigzag(1)) * 5000 + zigzag(1) + zigzag(0)
    with pytest.raises(DecodeError) as err:
        decode_body(RECURSIVE, deep)
    assert err.value.reason == "too_deep"


WIDE = EventSchema(
    {
        "type": "record",
        "name": "Wide",
        "namespace": "test",
        "fields": [
            {"name": "flag", "type": "boolean"},
            {"name": "d", "type": "double"},
            {"name": "ds", "type": {"type": "array", "items": "double"}},
            {"name": "fx", "type": {"type": "fixed", "name": "Four", "size": 4}},
            {"name": "m", "type": {"type": "map", "values": ["null", "string", "Four"]}},
            {
                "name": "big",
                "type": {"type": "enum", "name": "Big", "symbols": [f"S{i}" for i in range(100)]},
            },
            {"name": "n", "type": "long"},
        ],
    }
)


@pytest.mark.parametrize(
    "value", [0, 1, -1, 63, -64, 64, 8191, -8192, 8192, 2**31, 2**55, 2**56, 2**63 - 1, -(2**63)]
)
def test_every_varint_width_reads_as_fastavro_reads_it(value: int) -> None:
    record = {
        "flag": True,
        "d": 0.5,
        "ds": [1.5, -2.0],
        "fx": b"abcd",
        "m": {"a": None, "b": "x", "c": b"wxyz"},
        "big": "S99",
        "n": value,
    }
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, WIDE.parsed, record)
    assert decode_body(WIDE, buf.getvalue()) == record


def test_blocks_with_byte_sizes_are_read() -> None:
    # A writer may prefix blocks with a negative count and their size (spec: "Arrays").
    body = zigzag(-2) + zigzag(2) + zigzag(1) + zigzag(2) + zigzag(1) + zigzag(3) + zigzag(0)
    assert decode_body(schema_of(ARRAY_INT), body) == {"f0": [1, 2, 3]}


@pytest.mark.parametrize("schema", EVENTS, ids=lambda s: s.short_name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_valid_events_decode_exactly_as_fastavro_decodes_them(
    schema: EventSchema, seed: int
) -> None:
    record = example_record(schema, seed=seed, items=seed * 3)
    data = SingleObjectCodec([schema]).encode(schema, record)
    expected = fastavro.schemaless_reader(io.BytesIO(data[10:]), schema.parsed, None)
    assert decode_body(schema, data[10:]) == expected == record


@pytest.mark.parametrize("size", [0, 1, 63, 64, 127, 8191, 8192, 70_000])
def test_every_length_width_reads_as_fastavro_reads_it(size: int) -> None:
    schema = schema_of("string", "bytes", {"type": "map", "values": "bytes"})
    record = {
        "f0": "é" * (size // 2) + "x" * (size % 2),
        "f1": b"\x80" * size,
        "f2": {"k" * size: b""},
    }
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema.parsed, record)
    assert decode_body(schema, buf.getvalue()) == record


def test_mutated_events_are_decoded_as_fastavro_or_rejected_with_a_named_reason() -> None:
    # Seeded mutations (bytes flipped, dropped, inserted, cut) of every event: the codec
    # never raises anything but DecodeError, its reason is always a named one (the walker
    # agrees with the reader), and what it accepts is exactly what fastavro reads.
    rng = random.Random(12)
    codec = SingleObjectCodec(EVENTS)
    reasons: Counter[str] = Counter()
    for _ in range(3000):
        schema = rng.choice(EVENTS)
        record = example_record(schema, seed=rng.randrange(100), items=rng.randrange(4))
        data = bytearray(codec.encode(schema, record))
        for _ in range(rng.randrange(1, 4)):
            if len(data) <= 11:
                break
            at = rng.randrange(10, len(data))
            op = rng.randrange(4)
            if op == 0:
                data[at] = rng.randrange(256)
            elif op == 1:
                del data[at]
            elif op == 2:
                data.insert(at, rng.randrange(256))
            else:
                del data[max(at, 11) :]
        try:
            _, decoded = codec.decode(bytes(data))
        except DecodeError as exc:
            reasons[exc.reason] += 1
            continue
        reasons["accepted"] += 1
        stream = io.BytesIO(bytes(data[10:]))
        assert fastavro.schemaless_reader(stream, schema.parsed, None) == decoded
        assert stream.tell() == len(data) - 10
    assert "undecodable" not in reasons
    assert reasons["accepted"] and reasons["bad_enum_index"] and reasons["truncated"]


@pytest.mark.parametrize(
    ("types", "body", "value"),
    [
        ((ENUM,), b"\x82\x00", "A"),  # index 1 in two bytes
        ((ENUM,), b"\x86\x80\x00", "C"),  # index 3 in three bytes
        ((["null", "int"],), b"\x82\x00" + zigzag(5), 5),  # branch 1 in two bytes
    ],
)
def test_indices_in_longer_varints_read_as_java_and_fastavro_read_them(
    types: tuple[Any, ...], body: bytes, value: Any
) -> None:
    # Not minimal, but not forbidden: Java's BinaryDecoder and fastavro accept them.
    schema = schema_of(*types)
    assert fastavro_reads(schema, body)
    assert decode_body(schema, body) == {"f0": value}


def test_an_enum_of_more_than_64_symbols_uses_two_byte_indices() -> None:
    schema = schema_of({"type": "enum", "name": "Big", "symbols": [f"S{i}" for i in range(100)]})
    assert decode_body(schema, zigzag(99)) == {"f0": "S99"}
    with pytest.raises(DecodeError) as err:
        decode_body(schema, zigzag(100))
    assert err.value.reason == "bad_enum_index"

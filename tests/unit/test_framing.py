"""Both framings round-trip every event; hostile bytes fail fast, clearly and cheaply."""

from __future__ import annotations

import tracemalloc

import pytest

from edgeloop.core.errors import DecodeError, EncodeError
from edgeloop.schemas import catalog
from edgeloop.schemas.bounded import DecodeLimits
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.framing import (
    ConfluentCodec,
    SingleObjectCodec,
    confluent_to_single,
    single_to_confluent,
)
from edgeloop.schemas.samples import example_record

EVENTS = sorted(catalog.catalog().values(), key=lambda s: s.name)


def zigzag(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@pytest.fixture
def single() -> SingleObjectCodec:
    return SingleObjectCodec(EVENTS)


@pytest.fixture
def confluent() -> ConfluentCodec:
    codec = ConfluentCodec()
    for schema_id, schema in enumerate(EVENTS, start=1):
        codec.add(schema_id, schema)
    return codec


@pytest.mark.parametrize("schema", EVENTS, ids=lambda s: s.short_name)
def test_single_object_round_trip(single: SingleObjectCodec, schema: EventSchema) -> None:
    record = example_record(schema, seed=7)
    data = single.encode(schema, record)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == schema.fingerprint
    decoded_schema, decoded = single.decode(data)
    assert decoded_schema is schema
    assert decoded == record


@pytest.mark.parametrize("schema", EVENTS, ids=lambda s: s.short_name)
def test_confluent_round_trip_and_reframing(
    single: SingleObjectCodec, confluent: ConfluentCodec, schema: EventSchema
) -> None:
    schema_id = EVENTS.index(schema) + 1
    record = example_record(schema, seed=3)
    data = confluent.encode(schema_id, schema, record)
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == schema_id
    assert confluent.decode(data) == (schema_id, schema, record)
    # Re-framing swaps headers only: both directions give byte-identical messages.
    single_bytes = single.encode(schema, record)
    assert single_to_confluent(single_bytes, schema_id) == data
    assert confluent_to_single(data, schema) == single_bytes


def test_fingerprint_matches_the_avro_specification() -> None:
    # The spec's CRC-64-AVRO of the canonical form `"int"` is 0x7275d51a3f395c8f,
    # written little-endian in single-object headers.
    schema = EventSchema({"type": "record", "name": "R", "fields": []})
    from fastavro.schema import fingerprint

    assert bytes.fromhex(fingerprint('"int"', "CRC-64-AVRO")) == (0x7275D51A3F395C8F).to_bytes(
        8, "little"
    )
    assert len(schema.fingerprint) == 8


def inference(single: SingleObjectCodec) -> bytes:
    schema = catalog.get("InferenceEvent")
    return single.encode(schema, example_record(schema))


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda d: b"\xc3", "truncated_header"),
        (lambda d: b"\xc3\x02" + d[2:], "bad_magic"),
        (lambda d: d[:2] + b"\x00" * 8 + d[10:], "unknown_fingerprint"),
        (lambda d: d[:-3], "truncated"),
        (lambda d: d + b"\x00", "trailing_bytes"),
    ],
    ids=["short-header", "bad-magic", "unknown-fingerprint", "truncated-body", "trailing"],
)
def test_corrupt_single_object_messages_are_rejected_with_a_reason(
    single: SingleObjectCodec, mangle: object, reason: str
) -> None:
    data = mangle(inference(single))  # type: ignore[operator]
    with pytest.raises(DecodeError) as err:
        single.decode(data)
    assert err.value.reason == reason


def test_truncated_body_error_names_schema_and_field(single: SingleObjectCodec) -> None:
    data = inference(single)
    # Cut inside the `latency` record near the end of the body.
    with pytest.raises(DecodeError) as err:
        single.decode(data[:-4])
    message = str(err.value)
    assert "InferenceEvent" in message
    assert err.value.path is not None and err.value.path.startswith("InferenceEvent.")


def test_oversize_message_is_rejected_before_decoding() -> None:
    codec = SingleObjectCodec(EVENTS, DecodeLimits(max_message_bytes=64))
    with pytest.raises(DecodeError) as err:
        codec.decode(b"\xc3\x01" + b"\x00" * 100)
    assert err.value.reason == "oversize"
    assert "64" in str(err.value)


def test_unknown_confluent_schema_id_and_magic(confluent: ConfluentCodec) -> None:
    with pytest.raises(DecodeError) as err:
        confluent.decode(b"\x00\x00\x00\x03\xe7" + b"\x00" * 20)
    assert err.value.reason == "unknown_schema_id" and "999" in str(err.value)
    with pytest.raises(DecodeError) as err:
        confluent.decode(b"\x01\x00\x00\x00\x01")
    assert err.value.reason == "bad_magic"


ZERO_SIZE_ITEMS = EventSchema(
    {
        "type": "record",
        "name": "Bomb",
        "namespace": "test",
        "fields": [
            {"name": "ok", "type": "int"},
            {"name": "marks", "type": {"type": "array", "items": "null"}},
        ],
    }
)


def test_length_bomb_is_rejected_fast_with_little_memory() -> None:
    # A 5-byte body claiming 10^8 null items: fastavro alone builds an 800 MB list.
    codec = SingleObjectCodec([ZERO_SIZE_ITEMS])
    data = b"\xc3\x01" + ZERO_SIZE_ITEMS.fingerprint + zigzag(1) + zigzag(10**8)
    assert len(data) - 10 <= 6
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as err:
            codec.decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.reason == "too_many_items"
    assert err.value.path == "Bomb.marks"
    assert peak < 1_000_000, f"decoding a bomb used {peak} bytes"


@pytest.mark.parametrize("item", ["float", "long", "string"])
def test_claimed_counts_larger_than_the_body_fail_without_building_them(item: str) -> None:
    schema = EventSchema(
        {
            "type": "record",
            "name": "A",
            "fields": [{"name": "xs", "type": {"type": "array", "items": item}}],
        }
    )
    codec = SingleObjectCodec([schema])
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as err:
            codec.decode(b"\xc3\x01" + schema.fingerprint + zigzag(10**8))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.path == "A.xs"
    assert peak < 1_000_000


def test_bad_enum_index_and_union_branch_name_the_field(single: SingleObjectCodec) -> None:
    schema = catalog.get("ModelRelease")
    record = example_record(schema)
    record["parent_version"] = None
    data = bytearray(single.encode(schema, record))
    body = single.encode(schema, {**record, "stage": "UNKNOWN"})
    # Find the enum byte by diffing two encodings that differ only in `stage`.
    index = next(i for i, (a, b) in enumerate(zip(data, body, strict=True)) if a != b)
    data[index] = 0x7E  # zigzag 63: out of range
    with pytest.raises(DecodeError) as err:
        single.decode(bytes(data))
    assert err.value.path == "ModelRelease.stage"
    assert err.value.reason == "bad_enum_index"


def test_encode_error_names_the_field_and_value(single: SingleObjectCodec) -> None:
    schema = catalog.get("InferenceEvent")
    record = example_record(schema)
    record["seq"] = "not-a-number"
    with pytest.raises(EncodeError) as err:
        single.encode(schema, record)
    assert "seq" in str(err.value)
    assert "not-a-number" in str(err.value)

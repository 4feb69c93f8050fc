"""Compatibility decisions against Confluent's documented rules ("Schema Evolution and
Compatibility": which changes each level allows), through the compat module directly."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgeloop.core.errors import SchemaError
from edgeloop.schemas.registry import compat
from edgeloop.schemas.registry.compat import CompatibilityLevel as L


def record(*fields: dict[str, Any], name: str = "Reading") -> compat.AvroSchema:
    return compat.parse(
        json.dumps({"type": "record", "name": name, "namespace": "t", "fields": list(fields)})
    )


ID = {"name": "id", "type": "string"}
OPT = {"name": "note", "type": ["null", "string"], "default": None}
REQ = {"name": "unit", "type": "string"}
WITH_DEFAULT = {"name": "unit", "type": "string", "default": "C"}
INT = {"name": "value", "type": "int"}
LONG = {"name": "value", "type": "long"}


def enum(*symbols: str) -> dict[str, Any]:
    return {"name": "level", "type": {"type": "enum", "name": "Level", "symbols": list(symbols)}}


def ok(new: compat.AvroSchema, old: compat.AvroSchema, level: L) -> bool:
    return not compat.check(new, [(1, old)], level)


# (case, old, new, {level: compatible?}) — Confluent's table: BACKWARD allows deleting
# fields and adding optional ones; FORWARD allows adding fields and deleting optional
# ones; FULL allows only adding or deleting optional fields.
CASES = [
    (
        "add field with default",
        record(ID),
        record(ID, OPT),
        {L.BACKWARD: True, L.FORWARD: True, L.FULL: True, L.NONE: True},
    ),
    (
        "add field without default",
        record(ID),
        record(ID, REQ),
        {L.BACKWARD: False, L.FORWARD: True, L.FULL: False, L.NONE: True},
    ),
    (
        "remove field with default",
        record(ID, WITH_DEFAULT),
        record(ID),
        {L.BACKWARD: True, L.FORWARD: True, L.FULL: True},
    ),
    (
        "remove field without default",
        record(ID, REQ),
        record(ID),
        {L.BACKWARD: True, L.FORWARD: False, L.FULL: False},
    ),
    (
        "int -> long is a promotion",
        record(ID, INT),
        record(ID, LONG),
        {L.BACKWARD: True, L.FORWARD: False, L.FULL: False},
    ),
    (
        "long -> int narrows",
        record(ID, LONG),
        record(ID, INT),
        {L.BACKWARD: False, L.FORWARD: True},
    ),
    (
        "enum symbol added",
        record(ID, enum("LOW", "HIGH")),
        record(ID, enum("LOW", "HIGH", "MID")),
        {L.BACKWARD: True, L.FORWARD: False, L.FULL: False},
    ),
    (
        "enum symbol removed",
        record(ID, enum("LOW", "HIGH", "MID")),
        record(ID, enum("LOW", "HIGH")),
        {L.BACKWARD: False, L.FORWARD: True},
    ),
    (
        "record renamed",
        record(ID),
        record(ID, name="Other"),
        {L.BACKWARD: False, L.FORWARD: False, L.NONE: True},
    ),
    (
        "string -> int",
        record(ID, {"name": "v", "type": "string"}),
        record(ID, {"name": "v", "type": "int"}),
        {L.BACKWARD: False, L.FORWARD: False},
    ),
]


@pytest.mark.parametrize(("case", "old", "new", "expected"), CASES, ids=[c[0] for c in CASES])
def test_confluent_rules(
    case: str, old: compat.AvroSchema, new: compat.AvroSchema, expected: dict[L, bool]
) -> None:
    for level, compatible in expected.items():
        assert ok(new, old, level) is compatible, f"{case} under {level}"
        transitive = L(f"{level.value}_TRANSITIVE") if level is not L.NONE else level
        assert ok(new, old, transitive) is compatible, f"{case} under {transitive}"


def test_transitive_sees_what_the_latest_alone_hides() -> None:
    # v1 -> v2 adds a field with a default, v2 -> v3 drops the default: each step is
    # backward compatible, but v3 cannot read v1's data (no value and no default).
    v1 = record(ID)
    v2 = record(ID, WITH_DEFAULT)
    v3 = record(ID, REQ)
    assert ok(v2, v1, L.BACKWARD)
    assert ok(v3, v2, L.BACKWARD)
    assert not ok(v3, v1, L.BACKWARD)
    history = [(1, v1), (2, v2)]
    assert compat.check(v3, history, L.BACKWARD) == []
    problems = compat.check(v3, history, L.BACKWARD_TRANSITIVE)
    assert [p.version for p in problems] == [1]
    assert problems[0].kind == "reader_field_missing_default_value"
    assert "unit" in str(problems[0])
    assert compat.check(v3, history, L.FULL_TRANSITIVE) != []


def test_full_reports_both_directions() -> None:
    problems = compat.check(
        record(ID, INT), [(4, record(ID, {"name": "value", "type": "string"}))], L.FULL
    )
    assert {p.direction for p in problems} == {"backward", "forward"}
    assert all(p.version == 4 for p in problems)
    assert all("TYPE_MISMATCH" in str(p) for p in problems)


def test_no_previous_version_is_always_compatible() -> None:
    assert compat.check(record(ID), [], L.FULL_TRANSITIVE) == []


def test_parse_identity_ignores_whitespace_only() -> None:
    text = '{"type": "record", "name": "A", "fields": [ {"name": "x", "type": "int"} ]}'
    assert compat.parse(text).text == compat.parse(json.dumps(json.loads(text))).text
    assert compat.parse(text).name == "A"
    with_doc = json.loads(text) | {"doc": "documented"}
    assert compat.parse(json.dumps(with_doc)).text != compat.parse(text).text


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"type": "record", "name": "A"}',
        '{"type": "nope"}',
        '{"type": "record", "name": "A", "fields": [{"name": "x", "type": "int", "default": "s"}]}',
        # A union's default must belong to its first branch.
        '{"type": "record", "name": "A", "fields": [{"name": "x", "type": ["null", "int"], '
        '"default": 1}]}',
    ],
)
def test_invalid_schemas_are_refused(text: str) -> None:
    with pytest.raises(SchemaError):
        compat.parse(text)


def test_levels() -> None:
    assert L.FULL_TRANSITIVE.transitive
    assert L.FULL_TRANSITIVE.backward
    assert L.FULL_TRANSITIVE.forward
    assert not L.BACKWARD.forward
    assert not L.FORWARD.backward
    assert not L.NONE.backward
    assert not L.NONE.forward


def test_each_problem_names_its_own_field() -> None:
    # Two problems in one record: every message must sit with its own field and kind.
    old = record(ID, {"name": "v", "type": "string"})
    new = record(ID, {"name": "v", "type": "int"}, REQ)
    problems = compat.check(new, [(2, old)], L.BACKWARD)
    by_field = {p.location: p for p in problems}
    assert set(by_field) == {"/v", "/unit"}
    assert by_field["/v"].kind == "type_mismatch"
    assert "string" in by_field["/v"].message
    assert by_field["/unit"].kind == "reader_field_missing_default_value"
    assert "'unit'" in by_field["/unit"].message

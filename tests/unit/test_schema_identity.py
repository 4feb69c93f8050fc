"""Schema identity by Confluent's rules (its canonical string, and `normalize=true`).

Confluent's serializers send what Java's `Schema.toString()` writes, with attributes in
Java's order; the registry must find the schema it already holds, not mint a new id.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastavro.schema import to_parsing_canonical_form

from edgeloop.core.errors import RegistryError
from edgeloop.schemas import catalog
from edgeloop.schemas.registry import api, compat
from edgeloop.schemas.registry.registry import Registry, parse_request
from edgeloop.schemas.registry.state import config_key, encode, schema_key, schema_value
from tests.unit.test_registry_races import LogInMemory

# The example: the same schema, attributes in another order (Java's toString order).
A = '{"type":"record","name":"A","fields":[{"name":"x","type":"int"}]}'
A_REORDERED = '{"name":"A","type":"record","fields":[{"type":"int","name":"x"}]}'


def text(doc: Any, *, normalize: bool = False) -> str:
    return compat.parse(json.dumps(doc), normalize=normalize).text


def rec(name: str, *fields: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields), **extra}


INNER = {"type": "record", "name": "Inner", "fields": [{"name": "v", "type": "long"}]}

# Pairs that Java writes to the same canonical string: the same schema to Confluent.
SAME = [
    ("attribute order", json.loads(A), json.loads(A_REORDERED)),
    ("whitespace", json.loads(A), json.loads(A.replace(",", " ,\n  "))),
    (
        "primitive as an object",
        rec("A", {"name": "x", "type": "int"}),
        rec("A", {"name": "x", "type": {"type": "int"}}),
    ),
    (
        "dotted name vs name + namespace",
        rec("t.A", {"name": "x", "type": "int"}),
        rec("A", {"name": "x", "type": "int"}, namespace="t"),
    ),
    (
        "nested namespace repeating the enclosing one",
        rec("A", {"name": "i", "type": INNER}, namespace="t"),
        rec("A", {"name": "i", "type": {**INNER, "namespace": "t"}}, namespace="t"),
    ),
    (
        "alias relative vs fully qualified",
        rec("B", {"name": "x", "type": "int"}, namespace="t", aliases=["A"]),
        rec("B", {"name": "x", "type": "int"}, namespace="t", aliases=["t.A"]),
    ),
    (
        "reference qualified vs relative",
        rec("A", {"name": "i", "type": INNER}, {"name": "j", "type": "Inner"}, namespace="t"),
        rec("A", {"name": "i", "type": INNER}, {"name": "j", "type": "t.Inner"}, namespace="t"),
    ),
    (
        "ascending order stated",
        rec("A", {"name": "x", "type": "int"}),
        rec("A", {"name": "x", "type": "int", "order": "ascending"}),
    ),
]

# Differences that stay part of the identity for Confluent (and for us).
DIFFERENT = [
    (
        "doc",
        rec("A", {"name": "x", "type": "int"}),
        rec("A", {"name": "x", "type": "int"}, doc="d"),
    ),
    (
        "default",
        rec("A", {"name": "x", "type": "int", "default": 1}),
        rec("A", {"name": "x", "type": "int", "default": 2}),
    ),
    (
        "field order",
        rec("A", {"name": "x", "type": "int"}, {"name": "y", "type": "int"}),
        rec("A", {"name": "y", "type": "int"}, {"name": "x", "type": "int"}),
    ),
    (
        "logical type",
        rec("A", {"name": "x", "type": "long"}),
        rec("A", {"name": "x", "type": {"type": "long", "logicalType": "timestamp-micros"}}),
    ),
    ("namespace", rec("A", {"name": "x", "type": "int"}), rec("u.A", {"name": "x", "type": "int"})),
]


@pytest.mark.parametrize(("case", "one", "other"), SAME, ids=[c[0] for c in SAME])
def test_equivalent_spellings_are_one_schema(case: str, one: Any, other: Any) -> None:
    assert text(one) == text(other)


@pytest.mark.parametrize(("case", "one", "other"), DIFFERENT, ids=[c[0] for c in DIFFERENT])
def test_real_differences_stay_different_schemas(case: str, one: Any, other: Any) -> None:
    assert text(one) != text(other)


def test_canonical_text_is_a_fixed_point() -> None:
    # What the registry stores must identify itself when sent back (GET, then register).
    for _, one, other in SAME + DIFFERENT:
        for doc in (one, other):
            for normalize in (False, True):
                once = text(doc, normalize=normalize)
                assert compat.parse(once, normalize=normalize).text == once
                pcf = to_parsing_canonical_form(doc)
                assert to_parsing_canonical_form(json.loads(once)) == pcf


def test_normalize_also_ignores_property_order_and_name_qualification() -> None:
    one = rec("A", {"name": "x", "type": "int"}, namespace="t", owner="me", team="x")
    other = rec("t.A", {"name": "x", "type": "int"}, team="x", owner="me")
    assert text(one) != text(other)  # custom properties keep their order by default
    assert text(one, normalize=True) == text(other, normalize=True)
    assert json.loads(text(one, normalize=True))["name"] == "t.A"


@pytest.fixture
def log() -> LogInMemory:
    store = LogInMemory()
    store.state = type(store.state)(identity=compat.stored_identity)
    return store


@pytest.fixture
def registry(log: LogInMemory) -> Registry:
    return Registry(log)  # type: ignore[arg-type]


async def test_lookup_and_register_find_the_reordered_schema(registry: Registry) -> None:
    first = await registry.register("s", parse_request({"schema": A}))
    assert (first.id, first.version) == (1, 1)
    found = registry.lookup("s", parse_request({"schema": A_REORDERED}))
    assert (found.id, found.version) == (1, 1)
    again = await registry.register("s", parse_request({"schema": A_REORDERED}))
    assert (again.id, again.version) == (1, 1)
    assert [v.version for v in registry.versions("s")] == [1]


async def test_normalize_on_register_and_lookup(registry: Registry) -> None:
    one = json.dumps(rec("A", {"name": "x", "type": "int"}, namespace="t", owner="me", team="x"))
    other = json.dumps(rec("t.A", {"name": "x", "type": "int"}, team="x", owner="me"))
    first = await registry.register("s", parse_request({"schema": one}, normalize=True))
    with pytest.raises(RegistryError) as missing:
        registry.lookup("s", parse_request({"schema": other}))
    assert missing.value.error_code == api.SCHEMA_NOT_FOUND
    found = registry.lookup("s", parse_request({"schema": other}, normalize=True), normalize=True)
    assert found.id == first.id
    again = await registry.register(
        "s", parse_request({"schema": other}, normalize=True), normalize=True
    )
    assert (again.id, again.version) == (first.id, 1)


def test_a_replayed_compact_record_is_identified_canonically(log: LogInMemory) -> None:
    # Records written before identity followed Confluent hold the compact JSON as sent.
    log.state.apply(encode(schema_key("s", 1, "old")), encode(schema_value("s", 1, 1, A_REORDERED)))
    assert log.state.id_by_schema[compat.parse(A).text] == 1


async def test_deleting_a_subject_deletes_its_compatibility_level(
    log: LogInMemory, registry: Registry
) -> None:
    # The sequence: NONE on the subject, register, delete (soft, then permanent),
    # create the subject again: the global level (BACKWARD) applies again.
    await registry.set_level("s", compat.CompatibilityLevel.NONE)
    await registry.register("s", parse_request({"schema": A}))
    await registry.delete_subject("s", permanent=False)
    assert "s" not in log.state.configs  # GET /config/s answers 40408 from here on
    await registry.delete_subject("s", permanent=True)
    await registry.register("s", parse_request({"schema": A}))
    assert registry.level("s") is compat.CompatibilityLevel.BACKWARD
    string_x = json.dumps(rec("A", {"name": "x", "type": "string"}))
    with pytest.raises(RegistryError) as refused:
        await registry.register("s", parse_request({"schema": string_x}))
    assert refused.value.error_code == api.INCOMPATIBLE_SCHEMA


async def test_a_level_set_while_soft_deleted_goes_with_the_permanent_delete(
    log: LogInMemory, registry: Registry
) -> None:
    await registry.register("s", parse_request({"schema": A}))
    await registry.delete_subject("s", permanent=False)
    await registry.set_level("s", compat.CompatibilityLevel.NONE)
    await registry.delete_subject("s", permanent=True)
    assert "s" not in log.state.configs
    # A level on another subject is untouched.
    log.state.apply(encode(config_key("t")), encode({"compatibilityLevel": "NONE"}))
    assert log.state.configs["t"] == "NONE"


@pytest.mark.parametrize("name", sorted(catalog.catalog()), ids=lambda n: n.rsplit(".", 1)[-1])
def test_the_canonical_string_is_the_same_schema(name: str) -> None:
    # Rewriting must never change what the schema means: same Parsing Canonical Form
    # (hence the same single-object fingerprint), and every doc and default kept.
    shipped = catalog.get(name)
    for normalize in (False, True):
        rewritten = compat.parse(shipped.text, normalize=normalize).text
        assert to_parsing_canonical_form(json.loads(rewritten)) == shipped.canonical
        assert rewritten.count('"doc"') == shipped.text.count('"doc"')
        assert rewritten.count('"default"') == shipped.text.count('"default"')

"""Compatibility of renamed and re-namespaced types, as the Java reference decides it.

Expected verdicts come from the Avro specification ("Schema Resolution": named types
match by unqualified name; "Aliases": an alias is fully qualified or relative to the
namespace of the type it names, and only the reader's aliases apply) and from
Confluent's documentation (BACKWARD: the new schema reads data written with the old;
FORWARD: the old reads the new; FULL: both). The Apache `avro` Python checker compared
alias strings as written; a relative alias never matched, unlike Java and Confluent.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgeloop.schemas.registry import compat
from edgeloop.schemas.registry.compat import CompatibilityLevel as L


def outer(inner: Any, *, name: str = "Outer", namespace: str | None = "t") -> str:
    doc: dict[str, Any] = {"type": "record", "name": name, "fields": [{"name": "i", "type": inner}]}
    if namespace is not None:
        doc["namespace"] = namespace
    return json.dumps(doc)


def rec(name: str, **extra: Any) -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": [{"name": "v", "type": "long"}], **extra}


def enum(name: str, **extra: Any) -> dict[str, Any]:
    return {"type": "enum", "name": name, "symbols": ["A", "B"], **extra}


def fixed(name: str, **extra: Any) -> dict[str, Any]:
    return {"type": "fixed", "name": name, "size": 4, **extra}


def top(name: str, **extra: Any) -> str:
    return json.dumps(
        {"type": "record", "name": name, "fields": [{"name": "v", "type": "long"}], **extra}
    )


# (case, old (writer), new (reader), level, compatible?)
CASES = [
    # The case: a nested record renamed, alias relative to namespace `t`.
    (
        "nested record, relative alias",
        outer(rec("Inner")),
        outer(rec("Inner2", aliases=["Inner"])),
        L.BACKWARD,
        True,
    ),
    (
        "nested record, qualified alias",
        outer(rec("Inner")),
        outer(rec("Inner2", aliases=["t.Inner"])),
        L.BACKWARD,
        True,
    ),
    ("nested record, no alias", outer(rec("Inner")), outer(rec("Inner2")), L.BACKWARD, False),
    (
        "top-level record, relative alias",
        top("A", namespace="t"),
        top("B", namespace="t", aliases=["A"]),
        L.BACKWARD,
        True,
    ),
    (
        "top-level record, dotted name, relative alias",
        top("t.A"),
        top("t.B", aliases=["A"]),
        L.BACKWARD,
        True,
    ),
    ("enum, relative alias", outer(enum("E")), outer(enum("E2", aliases=["E"])), L.BACKWARD, True),
    (
        "fixed, relative alias",
        outer(fixed("F")),
        outer(fixed("F2", aliases=["F"])),
        L.BACKWARD,
        True,
    ),
    (
        "union branch, relative alias",
        outer(["null", rec("Inner")]),
        outer(["null", rec("Inner2", aliases=["Inner"])]),
        L.BACKWARD,
        True,
    ),
    (
        "array items, relative alias",
        outer({"type": "array", "items": rec("Inner")}),
        outer({"type": "array", "items": rec("Inner2", aliases=["Inner"])}),
        L.BACKWARD,
        True,
    ),
    (
        "map values, relative alias",
        outer({"type": "map", "values": rec("Inner")}),
        outer({"type": "map", "values": rec("Inner2", aliases=["Inner"])}),
        L.BACKWARD,
        True,
    ),
    # Namespaces of nested types: inherited from a dotted enclosing name, or their own.
    (
        "namespace inherited from a dotted name",
        outer(rec("Inner"), name="a.b.Outer", namespace=None),
        outer(rec("Inner2", aliases=["Inner"]), name="a.b.Outer", namespace=None),
        L.BACKWARD,
        True,
    ),
    (
        "own namespace, relative alias",
        outer(rec("Inner", namespace="v")),
        outer(rec("Inner2", namespace="v", aliases=["Inner"])),
        L.BACKWARD,
        True,
    ),
    # The alias resolves in the reader type's namespace `u`: u.Inner is not t.Inner.
    (
        "alias resolving to another namespace",
        outer(rec("Inner")),
        outer(rec("Inner2", namespace="u", aliases=["Inner"])),
        L.BACKWARD,
        False,
    ),
    (
        "qualified alias into another namespace",
        outer(rec("Inner")),
        outer(rec("Inner2", namespace="u", aliases=["t.Inner"])),
        L.BACKWARD,
        True,
    ),
    # Names match unqualified (spec: "the same (unqualified) name"; Java's schemaNameEquals).
    (
        "same name, other namespace",
        outer(rec("Inner")),
        outer(rec("Inner", namespace="u")),
        L.BACKWARD,
        True,
    ),
    # Aliases are the reader's: the old schema has none for the new name.
    (
        "renamed with alias, FORWARD",
        outer(rec("Inner")),
        outer(rec("Inner2", aliases=["Inner"])),
        L.FORWARD,
        False,
    ),
    (
        "renamed with alias, FULL",
        outer(rec("Inner")),
        outer(rec("Inner2", aliases=["Inner"])),
        L.FULL,
        False,
    ),
    # Field aliases are plain names (the spec gives fields no namespace).
    (
        "field renamed with alias",
        top("t.A"),
        json.dumps(
            {
                "type": "record",
                "name": "t.A",
                "fields": [{"name": "w", "type": "long", "aliases": ["v"]}],
            }
        ),
        L.BACKWARD,
        True,
    ),
    (
        "field renamed without alias",
        top("t.A"),
        json.dumps({"type": "record", "name": "t.A", "fields": [{"name": "w", "type": "long"}]}),
        L.BACKWARD,
        False,
    ),
]


@pytest.mark.parametrize(
    ("case", "old", "new", "level", "compatible"), CASES, ids=[c[0] for c in CASES]
)
def test_named_types_resolve_as_in_java(
    case: str, old: str, new: str, level: L, compatible: bool
) -> None:
    problems = compat.check(compat.parse(new), [(1, compat.parse(old))], level)
    assert (not problems) is compatible, [str(p) for p in problems]


def test_a_refusal_still_names_the_mismatch() -> None:
    problems = compat.check(
        compat.parse(outer(rec("Inner2"))), [(1, compat.parse(outer(rec("Inner"))))], L.BACKWARD
    )
    assert problems and "name_mismatch" in str(problems[0]).lower()

"""The TypedDicts in schemas/events.py match the .avsc files field for field."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest

from edgeloop.schemas import catalog, events
from edgeloop.schemas.catalog import EventSchema

PRIMITIVES: dict[str, type] = {
    "int": int,
    "long": int,
    "float": float,
    "double": float,
    "string": str,
    "bytes": bytes,
    "boolean": bool,
}


def assert_matches(avro: Any, hint: Any, path: str) -> None:
    if isinstance(avro, dict) and avro.get("type") in PRIMITIVES:
        avro = avro["type"]
    if isinstance(avro, str):
        assert hint is PRIMITIVES[avro], f"{path}: {hint} is not {avro}"
    elif isinstance(avro, list):
        assert avro[0] == "null" and len(avro) == 2, f"{path}: only [null, X] unions are used"
        assert get_origin(hint) in (types.UnionType, typing.Union), path
        non_null = [a for a in get_args(hint) if a is not type(None)]
        assert len(non_null) == 1 and type(None) in get_args(hint), path
        assert_matches(avro[1], non_null[0], path)
    elif avro["type"] == "enum":
        assert get_origin(hint) is Literal, path
        assert list(get_args(hint)) == avro["symbols"], f"{path}: enum symbols differ"
    elif avro["type"] == "array":
        assert get_origin(hint) is list, path
        assert_matches(avro["items"], get_args(hint)[0], f"{path}[]")
    elif avro["type"] == "map":
        assert get_origin(hint) is dict and get_args(hint)[0] is str, path
        assert_matches(avro["values"], get_args(hint)[1], f"{path}{{}}")
    elif avro["type"] == "record":
        assert_record(avro, hint, path)
    else:
        pytest.fail(f"{path}: unexpected Avro type {avro!r}")


def assert_record(avro: dict[str, Any], hint: Any, path: str) -> None:
    assert hint.__name__ == avro["name"], path
    hints = get_type_hints(hint)
    assert list(hints) == [f["name"] for f in avro["fields"]], f"{path}: field names/order"
    for field in avro["fields"]:
        assert_matches(field["type"], hints[field["name"]], f"{path}.{field['name']}")


@pytest.mark.parametrize(
    "schema", sorted(catalog.catalog().values(), key=lambda s: s.name), ids=lambda s: s.short_name
)
def test_typed_view_matches_schema(schema: EventSchema) -> None:
    assert_record(schema.schema, getattr(events, schema.short_name), schema.short_name)

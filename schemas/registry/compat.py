"""Schema parsing and compatibility decisions, delegated to the Apache `avro` package.

Confluent's rules, stated as reader/writer pairs (the Avro specification's resolution):
BACKWARD means the new schema can read what the previous one wrote; FORWARD means the
previous schema can read what the new one writes; FULL is both. The plain levels compare
with the latest live version only, the `_TRANSITIVE` forms with every live version.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import avro.errors
import avro.io
import avro.schema
from avro.compatibility import (
    ReaderWriterCompatibilityChecker,
    SchemaCompatibilityType,
    lookup_writer_field,
    schema_name_equals,
)

from edgeloop.core.errors import SchemaError
from edgeloop.schemas.registry import canonical

# avro ships no type annotations; this is the one place its checker is built.
_new_checker: Callable[[], Any] = ReaderWriterCompatibilityChecker


class CompatibilityLevel(StrEnum):
    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"
    NONE = "NONE"

    @property
    def transitive(self) -> bool:
        return self.value.endswith("_TRANSITIVE")

    @property
    def backward(self) -> bool:
        return self.value.startswith(("BACKWARD", "FULL"))

    @property
    def forward(self) -> bool:
        return self.value.startswith(("FORWARD", "FULL"))


# Confluent's default when neither the subject nor the global config names a level.
DEFAULT_LEVEL = CompatibilityLevel.BACKWARD


@dataclass(frozen=True)
class AvroSchema:
    """A validated schema: `text` is its canonical string, which identifies it (and is
    stored); `parsed` has its aliases qualified for the checker (see `canonical`)."""

    text: str
    parsed: avro.schema.Schema

    @property
    def name(self) -> str:
        fullname = getattr(self.parsed, "fullname", None)
        return str(fullname) if fullname else str(self.parsed.type)


def parse(text: str, *, normalize: bool = False) -> AvroSchema:
    """Validate `text` as an Avro schema; SchemaError names what is wrong.

    Args:
        text: the schema as JSON text.
        normalize: identify it by Confluent's normalized form (`normalize=true`).

    Returns:
        The schema with its identity (`canonical.canonical_text`: Confluent's canonical
        string, so attribute order, whitespace and redundant namespaces do not make a
        new schema, while docs, defaults and field order do).

    Raises:
        SchemaError: not JSON, not a valid Avro schema, or a default that does not match
            its field's type.
    """
    try:
        doc: Any = json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        raise SchemaError(f"schema is not valid JSON: {exc}") from exc
    try:
        parsed = avro.schema.parse(json.dumps(canonical.qualify_aliases(doc)))
        identity = canonical.canonical_text(doc, normalize=normalize)
    except (avro.errors.AvroException, ValueError, TypeError, KeyError) as exc:
        raise SchemaError(f"invalid Avro schema: {exc}") from exc
    _check_defaults(parsed, set())
    return AvroSchema(identity, parsed)


@functools.lru_cache(maxsize=1024)
def parse_cached(text: str, normalize: bool = False) -> AvroSchema:
    """`parse`, for texts read again and again (stored schemas are few and immutable)."""
    return parse(text, normalize=normalize)


def stored_identity(text: str) -> str:
    """The identity of a schema text read from the `_schemas` log.

    Texts written by this registry are canonical (or normalized) already and stay as they
    are; records from before identity followed Confluent held compact JSON and are
    rewritten to the canonical string, so a replay identifies them by the same rules.
    Deterministic, so every instance applies the log the same way.
    """
    try:
        identity = parse_cached(text).text
        if text in (identity, parse_cached(text, True).text):
            return text
    except SchemaError:
        return text  # not ours to judge while replaying; kept verbatim
    return identity


def _check_defaults(schema: Any, seen: set[str]) -> None:
    """Refuse field defaults that do not match their type, as Confluent does.

    The `avro` package parses them unchecked; a bad default would only surface when a
    reader resolves old data against the schema, far from the registration that caused it.
    """
    kind = schema.type
    if kind == "record":
        if schema.fullname in seen:
            return
        seen.add(schema.fullname)
        for f in schema.fields:
            if f.has_default and not _default_ok(f.type, f.default):
                raise SchemaError(
                    f"invalid Avro schema: default {f.default!r} of field "
                    f"{schema.fullname}.{f.name} does not match its type {f.type}"
                )
            _check_defaults(f.type, seen)
    elif kind == "union":
        for branch in schema.schemas:
            _check_defaults(branch, seen)
    elif kind == "array":
        _check_defaults(schema.items, seen)
    elif kind == "map":
        _check_defaults(schema.values, seen)


def _default_ok(schema: Any, value: Any) -> bool:
    kind = schema.type
    if kind == "union":  # the spec: a union's default belongs to its first branch
        return _default_ok(schema.schemas[0], value)
    if kind in ("bytes", "fixed"):  # JSON defaults spell bytes as strings
        return isinstance(value, str) and (kind == "bytes" or len(value) == schema.size)
    if kind == "record":
        return isinstance(value, dict) and all(
            _default_ok(f.type, value[f.name]) if f.name in value else f.has_default
            for f in schema.fields
        )
    if kind == "array":
        return isinstance(value, list) and all(_default_ok(schema.items, v) for v in value)
    if kind == "map":
        return isinstance(value, dict) and all(
            _default_ok(schema.values, v) for v in value.values()
        )
    return _primitive_ok(schema, value)


def _primitive_ok(schema: Any, value: Any) -> bool:
    if schema.type in ("float", "double"):  # JSON has one number type; avro wants floats
        return isinstance(value, int | float) and not isinstance(value, bool)
    return bool(avro.io.validate(schema, value))


@dataclass(frozen=True)
class Incompatibility:
    """One reason why `new` cannot replace the schema of `version`."""

    version: int | None
    direction: str  # "backward": new reads old; "forward": old reads new
    kind: str  # avro's incompatibility type, e.g. reader_field_missing_default_value
    message: str
    location: str

    def __str__(self) -> str:
        where = f"version {self.version}" if self.version is not None else "the previous schema"
        reader, writer = (
            ("the new schema", where) if self.direction == "backward" else (where, "the new schema")
        )
        return (
            f"{self.kind.upper()} at {self.location}: {self.message} "
            f"({self.direction}: {reader} cannot read data written by {writer})"
        )


def _pair(
    reader: AvroSchema, writer: AvroSchema, version: int | None, direction: str
) -> list[Incompatibility]:
    # The verdict is avro's. A fresh checker per pair: it memoizes by object identity.
    result = _new_checker().get_compatibility(reader.parsed, writer.parsed)
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    found = _explain(reader.parsed, writer.parsed, "", set())
    if not found:  # a case the walk below does not model: avro's own words, unpaired
        found = [
            (
                "incompatible",
                "; ".join(sorted(result.messages)),
                ", ".join(sorted(result.locations)),
            )
        ]
    return [
        Incompatibility(version, direction, kind, message, location or "/")
        for kind, message, location in found
    ]


def _explain(
    reader: Any, writer: Any, path: str, seen: set[tuple[str, str]]
) -> list[tuple[str, str, str]]:
    """Each incompatibility as (kind, message, field path).

    avro's result merges messages and locations into unordered sets, which loses which
    message belongs where once a record has two problems. Walking the record fields here
    keeps them paired; every leaf decision is still avro's checker.
    """
    if reader.type == "record" and writer.type == "record":
        pair = (reader.fullname, writer.fullname)
        if pair in seen:  # a recursive schema: this pair is being explained already
            return []
        seen.add(pair)
        found: list[tuple[str, str, str]] = []
        if not schema_name_equals(reader, writer):
            found.append(
                (
                    "name_mismatch",
                    f"record {reader.fullname} reads {writer.fullname} (no alias)",
                    path or "/",
                )
            )
        for field in reader.fields:
            where = f"{path}/{field.name}"
            theirs = lookup_writer_field(writer_schema=writer, reader_field=field)
            if theirs is not None:
                found += _explain(field.type, theirs.type, where, seen)
            elif not field.has_default:
                found.append(
                    (
                        "reader_field_missing_default_value",
                        f"field {field.name!r} has no default and the writer's schema lacks it",
                        where,
                    )
                )
        return found
    result = _new_checker().get_compatibility(reader, writer)
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    kinds = sorted({k.value for k in result.incompatibilities})
    return [("+".join(kinds), "; ".join(sorted(result.messages)), path or "/")]


def check(
    new: AvroSchema, previous: list[tuple[int | None, AvroSchema]], level: CompatibilityLevel
) -> list[Incompatibility]:
    """Every incompatibility of `new` with `previous` (oldest first) under `level`.

    An empty list means compatible. For a non-transitive level only the last entry of
    `previous` (the latest version) is compared.
    """
    if level is CompatibilityLevel.NONE or not previous:
        return []
    against = previous if level.transitive else previous[-1:]
    found: list[Incompatibility] = []
    for version, old in against:
        if level.backward:
            found += _pair(new, old, version, "backward")
        if level.forward:
            found += _pair(old, new, version, "forward")
    return found

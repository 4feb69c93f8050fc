"""Walks an Avro binary body against its schema without building values: the explainer.

The strict readers (`strict_reader`) only detect that a body is invalid; this walker then
re-reads it and names the reason and the field path (`InferenceEvent.latency.decision_us:
truncated: a varint needs 1 bytes, 0 left`). It checks every length, count and index
against the bytes that are really there and against a total item budget, and every value
rule the readers enforce, so both agree on what is invalid. `min_size` also serves the
readers: the fewest bytes an item can take bounds what a claimed count may be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeloop.core.errors import ConfigError, DecodeError

_FIXED_SIZE = {"null": 0, "boolean": 1, "float": 4, "double": 8}
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
_MAX_DEPTH = 64
_COMPLEX = {"record", "error", "enum", "fixed", "array", "map"}
# 9999-12-31T23:59:59.999999Z in microseconds since the epoch: Python's datetime.max.
MAX_TIMESTAMP_US = 253_402_300_799_999_999
# Logical types on `long` whose values are instants, by their unit in microseconds.
TIMESTAMP_UNITS = {
    "timestamp-micros": 1,
    "local-timestamp-micros": 1,
    "timestamp-millis": 1000,
    "local-timestamp-millis": 1000,
}


@dataclass(frozen=True)
class DecodeLimits:
    """Caps for decoding untrusted bytes."""

    max_message_bytes: int = 1 << 20
    # Across all arrays and maps of one message: bounds the memory a body can make us use.
    max_collection_items: int = 100_000
    # The window for timestamp-micros/-millis values (inclusive, microseconds since the
    # epoch, UTC). Default: 1970-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999Z. The top
    # is what every consumer can represent (Python's datetime, hence fastavro and
    # confluent-kafka's AvroDeserializer with logical types, ends at year 9999); the
    # bottom is the epoch because no edgeloop event predates it, and a negative value is
    # a device clock that was never set or a corrupt field. Deployments may narrow it.
    min_timestamp_us: int = 0
    max_timestamp_us: int = MAX_TIMESTAMP_US

    def __post_init__(self) -> None:
        # An empty window would dead-letter every event: refuse it where it is set.
        if self.min_timestamp_us > self.max_timestamp_us:
            raise ConfigError(
                f"timestamp window is empty: min_timestamp_us={self.min_timestamp_us} > "
                f"max_timestamp_us={self.max_timestamp_us}"
            )
        if self.max_message_bytes < 1 or self.max_collection_items < 0:
            raise ConfigError(
                f"decode limits must be positive: max_message_bytes={self.max_message_bytes}, "
                f"max_collection_items={self.max_collection_items}"
            )


def timestamp_window(limits: DecodeLimits, per_unit_us: int) -> tuple[int, int]:
    """The accepted window in a field's own unit (1: micros, 1000: millis), inclusive;
    millisecond bounds round inwards."""
    return -(-limits.min_timestamp_us // per_unit_us), limits.max_timestamp_us // per_unit_us


class _Names:
    def __init__(self, schema: Any) -> None:
        self.types: dict[str, Any] = {}
        self._collect(schema, None)

    def _collect(self, node: Any, namespace: str | None) -> None:
        if isinstance(node, list):
            for branch in node:
                self._collect(branch, namespace)
        elif isinstance(node, dict):
            kind = node.get("type")
            if kind in ("record", "error", "enum", "fixed"):
                name = str(node["name"])
                namespace = node.get("namespace", namespace)
                full = name if "." in name or not namespace else f"{namespace}.{name}"
                self.types[full] = node
                self.types.setdefault(name, node)
                for fld in node.get("fields", ()):
                    self._collect(fld["type"], namespace)
            elif kind == "array":
                self._collect(node["items"], namespace)
            elif kind == "map":
                self._collect(node["values"], namespace)
            elif isinstance(kind, (dict, list)):
                self._collect(kind, namespace)

    def resolve(self, node: Any) -> Any:
        """Follow named references and `{"type": ...}` wrappers down to a real node."""
        while True:
            if isinstance(node, str):
                if node in _PRIMITIVES:
                    return node
                node = self.types[node]
            elif isinstance(node, dict):
                kind = node.get("type")
                if isinstance(kind, str) and kind in _PRIMITIVES:
                    return kind  # e.g. {"type": "long", "logicalType": "timestamp-micros"}
                if isinstance(kind, (dict, list)) or kind not in _COMPLEX:
                    node = kind
                    continue
                return node
            else:
                return node  # a union


def min_size(schema: Any, names: _Names | None = None, _seen: frozenset[str] = frozenset()) -> int:
    """The fewest bytes any value of `schema` can encode to."""
    names = names or _Names(schema)
    node = names.resolve(schema)
    if isinstance(node, str):
        return _FIXED_SIZE.get(node, 1)
    if isinstance(node, list):
        return 1  # the branch index
    kind = node["type"]
    if kind in ("record", "error"):
        full = node["name"]
        if full in _seen:  # recursive type: it must terminate, say through a union
            return 1
        return sum(min_size(f["type"], names, _seen | {full}) for f in node["fields"])
    if kind == "fixed":
        return int(node["size"])
    return 1  # enum index, array/map end marker


class BodyWalker:
    """Checks one encoded body; raises DecodeError naming the schema and field path."""

    def __init__(self, schema: dict[str, Any], limits: DecodeLimits) -> None:
        self.schema = schema
        self.schema_name = str(schema.get("name", "?"))
        self.names = _Names(schema)
        self.limits = limits

    def check(self, body: bytes | memoryview) -> None:
        self._buf = memoryview(body)
        self._pos = 0
        self._items = 0
        self._walk(self.schema, self.schema_name, 0)
        if self._pos != len(self._buf):
            self._fail(
                f"{len(self._buf) - self._pos} trailing bytes after the record",
                "trailing_bytes",
                self.schema_name,
            )

    def _fail(self, message: str, reason: str, path: str) -> None:
        raise DecodeError(message, reason=reason, schema=self.schema_name, path=path)

    def _need(self, n: int, path: str, what: str) -> None:
        left = len(self._buf) - self._pos
        if n > left:
            self._fail(f"truncated: {what} needs {n} bytes, {left} left", "truncated", path)

    def _long(self, path: str, kind: str = "long") -> int:
        # Spec, "Binary Encoding": int and long are zig-zag varints of 32 and 64 bits;
        # Java rejects more than 5 / 10 bytes ("Invalid int/long encoding").
        limit, bits = (5, 32) if kind == "int" else (10, 64)
        result = 0
        for i in range(limit):
            self._need(1, path, "a varint")
            b = self._buf[self._pos]
            self._pos += 1
            result |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if result >> bits:
                    self._fail(f"varint does not fit a {bits}-bit {kind}", f"bad_{kind}", path)
                return (result >> 1) ^ -(result & 1)
        self._fail(f"varint longer than {limit} bytes", "bad_varint", path)
        raise AssertionError  # unreachable: _fail raises

    def _walk(self, schema: Any, path: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            self._fail(f"nesting deeper than {_MAX_DEPTH}", "too_deep", path)
        logical = schema.get("logicalType") if isinstance(schema, dict) else None
        node = self.names.resolve(schema)
        if node == "long" and logical in TIMESTAMP_UNITS:
            self._timestamp(path, TIMESTAMP_UNITS[logical])
        elif isinstance(node, str):
            self._primitive(node, path)
        elif isinstance(node, list):
            index = self._long(path)
            if not 0 <= index < len(node):
                self._fail(
                    f"union branch {index} out of range 0..{len(node) - 1}", "bad_union_index", path
                )
            self._walk(node[index], path, depth + 1)
        else:
            self._complex(node, path, depth)

    def _timestamp(self, path: str, per_unit_us: int) -> None:
        value = self._long(path)
        lo, hi = timestamp_window(self.limits, per_unit_us)
        if not lo <= value <= hi:
            unit = "us" if per_unit_us == 1 else "ms"
            self._fail(
                f"timestamp {value} {unit} is outside the accepted window [{lo}, {hi}] {unit}",
                "bad_timestamp",
                path,
            )

    def _primitive(self, kind: str, path: str) -> None:
        if kind in _FIXED_SIZE:
            self._need(_FIXED_SIZE[kind], path, kind)
            if kind == "boolean" and self._buf[self._pos] > 1:
                self._fail(
                    f"boolean byte {self._buf[self._pos]} is neither 0 nor 1", "bad_boolean", path
                )
            self._pos += _FIXED_SIZE[kind]
        elif kind in ("int", "long"):
            self._long(path, kind)
        else:  # bytes, string
            size = self._long(path)
            if size < 0:
                self._fail(f"negative {kind} length {size}", "bad_length", path)
            self._need(size, path, f"a {kind} of length {size}")
            if kind == "string":
                try:
                    bytes(self._buf[self._pos : self._pos + size]).decode("utf-8")
                except UnicodeDecodeError as exc:
                    self._fail(f"string is not UTF-8: {exc.reason}", "bad_utf8", path)
            self._pos += size

    def _complex(self, node: dict[str, Any], path: str, depth: int) -> None:
        kind = node["type"]
        if kind in ("record", "error"):
            for fld in node["fields"]:
                self._walk(fld["type"], f"{path}.{fld['name']}", depth + 1)
        elif kind == "enum":
            index = self._long(path)
            if not 0 <= index < len(node["symbols"]):
                self._fail(
                    f"enum index {index} out of range 0..{len(node['symbols']) - 1}",
                    "bad_enum_index",
                    path,
                )
        elif kind == "fixed":
            self._need(int(node["size"]), path, f"fixed({node['size']})")
            self._pos += int(node["size"])
        elif kind in ("array", "map"):
            self._collection(node, kind, path, depth)
        else:
            self._fail(f"unsupported schema type {kind!r}", "bad_schema", path)

    def _collection(self, node: dict[str, Any], kind: str, path: str, depth: int) -> None:
        item = node["items"] if kind == "array" else node["values"]
        item_min = min_size(item, self.names) + (1 if kind == "map" else 0)
        index = 0
        while True:
            count = self._long(path)
            if count == 0:
                return
            block_end = -1
            if count < 0:  # a negative count is followed by the block's size in bytes
                count = -count
                size = self._long(path)
                if size < 0:
                    self._fail(f"negative block size {size}", "bad_length", path)
                block_end = self._pos + size
            self._items += count
            if self._items > self.limits.max_collection_items:
                self._fail(
                    f"{kind} claims {count} items; the message may hold at most "
                    f"{self.limits.max_collection_items} in all",
                    "too_many_items",
                    path,
                )
            left = len(self._buf) - self._pos
            if count * item_min > left:
                self._fail(
                    f"{kind} claims {count} items of at least {item_min} bytes, "
                    f"only {left} bytes left",
                    "truncated",
                    path,
                )
            for _ in range(count):
                item_path = f"{path}[{index}]"
                if kind == "map":
                    self._primitive("string", f"{item_path}.<key>")
                self._walk(item, item_path, depth + 1)
                index += 1
            if block_end >= 0 and self._pos != block_end:
                # Readers that skip a block by its size would land elsewhere: misread.
                self._fail(
                    f"block size says the block ends at byte {block_end}, "
                    f"its items end at {self._pos}",
                    "bad_block_size",
                    path,
                )

"""A strict Avro binary reader, compiled once per schema into straight-line Python.

Why not fastavro on the read path: fastavro 1.13 decodes hostile bytes into values that
the Avro specification ("Binary Encoding") forbids and that Java readers reject or read
differently, so the bridge would forward poison pills. Measured on fastavro 1.13.1's C
reader (tests/unit/test_strict_reader.py keeps each case):

- an enum index or union branch of -1 .. -n picks a symbol/branch by Python's negative
  indexing (zig-zag -1 on a 4-symbol enum reads as the last symbol; Java throws);
- a boolean byte other than 0 or 1 reads as True;
- an `int` outside 32 bits, a varint longer than 5 bytes (int) or 10 bytes (long), and a
  10-byte long whose value does not fit 64 bits are accepted (Java: "Invalid int/long
  encoding", or silent wrap-around);
- a negative block byte-size after a negative array/map count, or one that does not
  match the block, is ignored (readers that skip blocks by that size would misread).

This reader rejects each of them, plus negative or overlong lengths of bytes/strings,
invalid UTF-8, truncation, unbounded collections (an item budget per message, checked
before anything is built) and trailing bytes, and timestamps outside a declared window
(see `DecodeLimits`). Every rejection is a `DecodeError` with a `reason` (the
dead-letter reason) and the field path. It builds the same values fastavro does
(logical types off: timestamps stay int microseconds) at about fastavro's cost (the
framing benchmark measures both in the same run): a schema's reader is specialised code
with no per-field dispatch, records are dict literals and float arrays unpack in one
call, which pays for the checks; a long varint costs more in Python than in C, so
records made mostly of 8-byte longs are the slowest relative to fastavro.

Code generation, not interpretation, is what makes the checks cheap: every check is one
comparison inlined next to the read it guards. The generated source is built only from
the schema's structure; field names enter it as `repr` literals, symbols and tables as
constants in the function's globals, never as code.
"""

from __future__ import annotations

import contextlib
import functools
import json
import struct
from collections.abc import Callable
from typing import Any

from edgeloop.core.errors import DecodeError
from edgeloop.schemas.bounded import (
    TIMESTAMP_UNITS,
    BodyWalker,
    DecodeLimits,
    min_size,
    timestamp_window,
)

Reader = Callable[[bytes, int], dict[str, Any]]

_STRUCTS = {"float": ("f", 4), "double": ("d", 8)}


class _Invalid(Exception):  # noqa: N818 - internal signal, never escapes this module
    """Raised by generated code on any violation; the walker then names reason and path."""


def _bad() -> None:
    raise _Invalid


def _varint(buf: bytes, pos: int) -> tuple[int, int]:  # noqa: PLR0911 - unrolled
    """A long of two or more bytes: the spec's zig-zag varint, at most 10 bytes and 64
    bits (Java: "Invalid long encoding" beyond). Unrolled: a loop costs half again as much.
    """
    b = buf[pos]  # IndexError anywhere: truncated, explained by the walker
    r = b & 127
    b = buf[pos + 1]
    r |= (b & 127) << 7
    if b < 128:
        return (r >> 1) ^ -(r & 1), pos + 2
    b = buf[pos + 2]
    r |= (b & 127) << 14
    if b < 128:
        return (r >> 1) ^ -(r & 1), pos + 3
    b = buf[pos + 3]
    r |= (b & 127) << 21
    if b < 128:
        return (r >> 1) ^ -(r & 1), pos + 4
    b = buf[pos + 4]
    r |= (b & 127) << 28
    if b < 128:
        return (r >> 1) ^ -(r & 1), pos + 5
    b = buf[pos + 5]
    r |= (b & 127) << 35
    if b < 128:
        return (r >> 1) ^ -(r & 1), pos + 6
    b = buf[pos + 6]
    r |= (b & 127) << 42
    if b < 128:
        return (r >> 1) ^ -(r & 1), pos + 7
    b = buf[pos + 7]
    r |= (b & 127) << 49
    if b < 128:
        return (r >> 1) ^ -(r & 1), pos + 8
    b = buf[pos + 8]
    r |= (b & 127) << 56
    if b < 128:
        return (r >> 1) ^ -(r & 1), pos + 9
    b = buf[pos + 9]
    r |= (b & 127) << 63
    if b >= 128 or r >> 64:
        raise _Invalid
    return (r >> 1) ^ -(r & 1), pos + 10


def _varint32(buf: bytes, pos: int) -> tuple[int, int]:
    """An int of two to five bytes; its value must fit 32 bits (zig-zag)."""
    b = buf[pos]
    r = b & 127
    b = buf[pos + 1]
    r |= (b & 127) << 7
    if b < 128:
        return (r >> 1) ^ -(r & 1), pos + 2
    b = buf[pos + 2]
    r |= (b & 127) << 14
    if b < 128:
        return (r >> 1) ^ -(r & 1), pos + 3
    b = buf[pos + 3]
    r |= (b & 127) << 21
    if b < 128:
        return (r >> 1) ^ -(r & 1), pos + 4
    b = buf[pos + 4]
    r |= (b & 127) << 28
    if b >= 128 or r >> 32:
        raise _Invalid
    return (r >> 1) ^ -(r & 1), pos + 5


def _pick(buf: bytes, pos: int, values: tuple[Any, ...]) -> tuple[Any, int]:
    """`values[index]` for an index the one-byte table does not hold: a varint of two
    or more bytes in range; a one-byte index that reaches here is invalid."""
    if buf[pos] < 128:
        raise _Invalid
    index, pos = _varint(buf, pos)
    if not 0 <= index < len(values):
        raise _Invalid
    return values[index], pos


def _choices(values: list[Any]) -> tuple[Any, ...]:
    """Enum symbol / union branch by the raw byte of a one-byte index; None where the
    byte is not a valid index (a negative zig-zag value, or out of range)."""
    table: list[Any] = [None] * 256
    for index, value in enumerate(values[:64]):  # zig-zag 0..63 fit one byte
        table[index << 1] = value
    return tuple(table)


class _Compiler:
    """Emits `read(buf, start)` for one schema: detection only, inline; on any violation
    the walker re-reads the body and raises the DecodeError with reason and field path."""

    def __init__(self, schema: dict[str, Any], limits: DecodeLimits) -> None:
        self.schema = schema
        self.schema_name = str(schema.get("name", "?"))
        self.limits = limits
        self.walker = BodyWalker(schema, limits)
        self.names = self.walker.names
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self.counter = 0
        self.functions: dict[int, str] = {}  # id(record node) -> helper for recursion
        self.pending: list[tuple[str, dict[str, Any]]] = []

    def var(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def const(self, value: Any) -> str:
        name = self.var("K")
        self.consts[name] = value
        return name

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    # ---- types ---------------------------------------------------------------------

    def long(
        self, dst: str, depth: int, *, is_int: bool = False, wide: bool = False, first: bool = False
    ) -> None:
        """A zig-zag varint into `dst`. One or two bytes are read inline; an 8-byte long
        (`wide`: a timestamp, an id) is unpacked in one call when its continuation bits say
        so, and tried `first` where 8 bytes are the rule (timestamps of this century)."""
        eight = [
            # 8 bytes left, bytes 0-6 continue and byte 7 ends the varint ...
            "pos <= last and (b := _u64(buf, pos)[0]) & 0x8080808080808080 == 0x0080808080808080:",
            # ... gather the 7-bit groups (the masks drop the continuation bits).
            "    b = (b & 0x007F007F007F007F) | ((b & 0x7F007F007F007F00) >> 1)",
            "    b = (b & 0x00003FFF00003FFF) | ((b & 0x3FFF00003FFF0000) >> 2)",
            "    b = (b & 0x0FFFFFFF) | ((b & 0x0FFFFFFF00000000) >> 4)",
            f"    {dst} = (b >> 1) ^ -(b & 1)",
            "    pos += 8",
        ]
        one = ["(b := buf[pos]) < 128:", f"    {dst} = (b >> 1) ^ -(b & 1)", "    pos += 1"]
        two = [
            "(c := buf[pos + 1]) < 128:",
            "    b = (b & 127) | (c << 7)",
            f"    {dst} = (b >> 1) ^ -(b & 1)",
            "    pos += 2",
        ]
        # Cheapest first for the values each field usually holds.
        if wide and first:
            lines = ["if " + eight[0], *eight[1:], "elif " + one[0], *one[1:]]
            lines += ["elif " + two[0], *two[1:]]
        elif wide:
            lines = ["if " + one[0], *one[1:], "elif " + eight[0], *eight[1:]]
            lines += ["elif " + two[0], *two[1:]]
        else:
            lines = ["if " + one[0], *one[1:], "elif " + two[0], *two[1:]]
        lines += ["else:", f"    {dst}, pos = {'_varint32' if is_int else '_varint'}(buf, pos)"]
        for line in lines:
            self.emit(depth, line)

    def value(self, node: Any, dst: str, depth: int, stack: tuple[int, ...]) -> None:
        logical = node.get("logicalType") if isinstance(node, dict) else None
        node = self.names.resolve(node)
        if isinstance(node, str):
            if node == "long" and logical in TIMESTAMP_UNITS:
                self.long(dst, depth, wide=True, first=True)
                lo, hi = timestamp_window(self.limits, TIMESTAMP_UNITS[logical])
                self.emit(depth, f"if not {lo} <= {dst} <= {hi}:")
                self.emit(depth + 1, "_bad()")
            else:
                self.primitive(node, dst, depth)
        elif isinstance(node, list):
            self.union(node, dst, depth, stack)
        else:
            self.complex(node, dst, depth, stack)

    def primitive(self, kind: str, dst: str, depth: int) -> None:
        if kind == "null":
            self.emit(depth, f"{dst} = None")
        elif kind == "boolean":
            self.emit(depth, "b = buf[pos]")
            self.emit(depth, "if b > 1:")
            self.emit(depth + 1, "_bad()")
            self.emit(depth, f"{dst} = b == 1")
            self.emit(depth, "pos += 1")
        elif kind in ("int", "long"):
            # Longs in events are often ids and versions of 8 bytes, as timestamps are.
            self.long(dst, depth, is_int=kind == "int", wide=kind == "long")
        elif kind in _STRUCTS:
            code, size = _STRUCTS[kind]
            unpack = self.const(struct.Struct("<" + code).unpack_from)
            self.emit(depth, f"{dst} = {unpack}(buf, pos)[0]")
            self.emit(depth, f"pos += {size}")
        else:  # bytes, string: a length, never negative, within the buffer
            # One length byte (< 64) is the rule: its zig-zag sign bit must be clear.
            self.emit(depth, "if (b := buf[pos]) < 128:")
            self.emit(depth + 1, "pos += 1")
            self.emit(depth + 1, "e = pos + (b >> 1)")
            self.emit(depth + 1, "if b & 1 or e > end:")
            self.emit(depth + 2, "_bad()")
            self.emit(depth, "else:")
            self.emit(depth + 1, "e, pos = _varint(buf, pos)")
            self.emit(depth + 1, "e += pos")
            self.emit(depth + 1, "if not pos <= e <= end:")
            self.emit(depth + 2, "_bad()")
            # bytes.decode is strict UTF-8 (no surrogates, no overlong forms), as the spec
            # asks of strings; UnicodeDecodeError goes to the walker like any violation.
            self.emit(depth, f"{dst} = buf[pos:e]" + (".decode()" if kind == "string" else ""))
            self.emit(depth, "pos = e")

    def indexed(self, values: tuple[Any, ...], dst: str, depth: int) -> None:
        """An enum symbol or union branch: the common one-byte index through a table of
        valid choices; anything else (a longer varint, which Java and fastavro accept
        for small values too, or an invalid index) through `_pick`."""
        table = self.const(_choices(list(values)))
        self.emit(depth, f"if ({dst} := {table}[buf[pos]]) is None:")
        self.emit(depth + 1, f"{dst}, pos = _pick(buf, pos, {self.const(values)})")
        self.emit(depth, "else:")
        self.emit(depth + 1, "pos += 1")

    def union(self, branches: list[Any], dst: str, depth: int, stack: tuple[int, ...]) -> None:
        index = self.var("u")
        self.indexed(tuple(range(len(branches))), index, depth)
        for i, branch in enumerate(branches):
            self.emit(depth, f"{'if' if i == 0 else 'elif'} {index} == {i}:")
            self.value(branch, dst, depth + 1, stack)
        self.emit(depth, "else:")
        self.emit(depth + 1, "_bad()")

    def complex(self, node: dict[str, Any], dst: str, depth: int, stack: tuple[int, ...]) -> None:
        kind = node["type"]
        if kind in ("record", "error"):
            self.record(node, dst, depth, stack)
        elif kind == "enum":
            self.indexed(tuple(node["symbols"]), dst, depth)
        elif kind == "fixed":
            size = int(node["size"])
            self.emit(depth, f"if pos + {size} > end:")
            self.emit(depth + 1, "_bad()")
            self.emit(depth, f"{dst} = buf[pos:pos + {size}]")
            self.emit(depth, f"pos += {size}")
        else:  # array, map
            self.collection(node, kind, dst, depth, stack)

    def record(self, node: dict[str, Any], dst: str, depth: int, stack: tuple[int, ...]) -> None:
        if id(node) in stack:  # recursive: read through a helper function
            helper = self.functions.get(id(node))
            if helper is None:
                helper = self.functions[id(node)] = f"_record_{len(self.functions)}"
                self.pending.append((helper, node))
            self.emit(depth, f"{dst}, pos, items = {helper}(buf, pos, end, items)")
            return
        self.record_body(node, dst, depth, (*stack, id(node)))

    def record_body(
        self, node: dict[str, Any], dst: str, depth: int, stack: tuple[int, ...]
    ) -> None:
        values = []
        for fld in node["fields"]:
            var = self.var("v")
            self.value(fld["type"], var, depth, stack)
            values.append(f"{fld['name']!r}: {var}")
        self.emit(depth, f"{dst} = {{{', '.join(values)}}}")

    def collection(
        self, node: dict[str, Any], kind: str, dst: str, depth: int, stack: tuple[int, ...]
    ) -> None:
        item = node["items"] if kind == "array" else node["values"]
        item_min = min_size(item, self.names) + (1 if kind == "map" else 0)
        n, block = self.var("n"), self.var("k")
        self.emit(depth, f"{dst} = {'[]' if kind == 'array' else '{}'}")
        self.emit(depth, "while True:")
        d = depth + 1
        self.long(n, d)
        self.emit(d, f"if {n} == 0:")
        self.emit(d + 1, "break")
        # A negative count is followed by the block's size in bytes (spec: "Arrays"); it
        # must be the size of the block, or readers that skip by it would misread.
        self.emit(d, f"if {n} < 0:")
        self.emit(d + 1, f"{n} = -{n}")
        self.long(block, d + 1)
        self.emit(d + 1, f"if {block} < 0:")
        self.emit(d + 2, "_bad()")
        self.emit(d + 1, f"{block} += pos")
        self.emit(d, "else:")
        self.emit(d + 1, f"{block} = -1")
        # The item budget and the bytes left are checked before anything is built.
        self.emit(d, f"items += {n}")
        self.emit(
            d,
            f"if items > {self.limits.max_collection_items} or {n} * {item_min} > end - pos:",
        )
        self.emit(d + 1, "_bad()")
        resolved = self.names.resolve(item)
        if kind == "array" and isinstance(resolved, str) and resolved in _STRUCTS:
            code, size = _STRUCTS[resolved]  # a run of floats or doubles: one call
            self.emit(d, f"{dst}.extend(_unpack_from(f'<{{{n}}}{code}', buf, pos))")
            self.emit(d, f"pos += {n} * {size}")
        else:
            x = self.var("x")
            self.emit(d, f"for _ in range({n}):")
            if kind == "map":
                key = self.var("key")
                self.primitive("string", key, d + 1)
                self.value(item, x, d + 1, stack)
                self.emit(d + 1, f"{dst}[{key}] = {x}")
            else:
                self.value(item, x, d + 1, stack)
                self.emit(d + 1, f"{dst}.append({x})")
        self.emit(d, f"if {block} >= 0 and pos != {block}:")
        self.emit(d + 1, "_bad()")

    # ---- the function --------------------------------------------------------------

    def build(self) -> Reader:
        self.lines = []
        self.emit(0, "def read(buf, start):")
        self.emit(1, "pos = start")
        self.emit(1, "end = len(buf)")
        self.emit(1, "last = end - 8  # the last offset an 8-byte read may start at")
        self.emit(1, "items = 0")
        self.emit(1, "try:")
        self.record(self.schema, "r", 2, ())
        self.emit(2, "if pos != end:")
        self.emit(3, "_bad()")
        self.emit(1, "except _CAUGHT:")
        self.emit(2, "_explain(buf, start)")
        self.emit(1, "return r")
        main = list(self.lines)
        helpers: list[str] = []
        while self.pending:
            helper, node = self.pending.pop()
            self.lines = []
            self.emit(0, f"def {helper}(buf, pos, end, items):")
            self.emit(1, "last = end - 8")
            self.record_body(node, "r", 1, (id(node),))
            self.emit(1, "return r, pos, items")
            helpers += self.lines
        source = "\n".join(helpers + main) + "\n"
        namespace: dict[str, Any] = {
            "_CAUGHT": (_Invalid, IndexError, struct.error, UnicodeDecodeError, RecursionError),
            "_bad": _bad,
            "_varint": _varint,
            "_varint32": _varint32,
            "_pick": _pick,
            "_u64": struct.Struct("<Q").unpack_from,
            "_unpack_from": struct.unpack_from,
            "_explain": self._explain,
            **self.consts,
        }
        code = compile(source, f"<avro reader for {self.schema_name}>", "exec")
        exec(code, namespace)  # noqa: S102 - source built from the schema's structure only
        reader: Reader = namespace["read"]
        reader.__doc__ = source  # for debugging: help(reader) shows the generated code
        return reader

    def _explain(self, buf: bytes, start: int) -> None:
        with contextlib.suppress(RecursionError):
            self.walker.check(memoryview(buf)[start:])  # raises, naming reason and field
        raise DecodeError(
            "undecodable body", reason="undecodable", schema=self.schema_name
        ) from None


def compile_reader(schema: dict[str, Any], limits: DecodeLimits) -> Reader:
    """A strict reader for one record schema: `read(buf, start) -> record`.

    Args:
        schema: an Avro record schema (parsed JSON; logical types are honoured only for
            the timestamp window).
        limits: the item budget and timestamp window to enforce.

    Returns:
        A function decoding the body that starts at `buf[start]` and must end exactly at
        the end of `buf`.

    Raises:
        DecodeError: (from the returned function) with a `reason` for every value the
            Avro specification forbids, a truncated body, trailing bytes, an exhausted
            item budget or a timestamp outside the window; `path` names the field.
    """
    return _Compiler(schema, limits).build()


@functools.lru_cache(maxsize=256)
def cached_reader(schema_text: str, limits: DecodeLimits) -> Reader:
    """`compile_reader` for a schema given as JSON text, memoized (bounded).

    Compiling takes a few milliseconds; codecs built per call (in tests and tools) and
    codecs for the same schema in several services share one reader.
    """
    return compile_reader(json.loads(schema_text), limits)

"""What makes two Avro schemas "the same schema" to the registry: Confluent's rules.

Confluent identifies a schema by its *canonical string*: the schema parsed by Java Avro
and written back with `Schema.toString()` (`AvroSchema.canonicalString()`). Whatever that
writer does not preserve is not part of a schema's identity:

- whitespace and the order of attributes in each JSON object (Java writes reserved
  attributes in a fixed order: `type`, `name`, `namespace`, `doc`, then `fields` /
  `symbols` + `default` / `size` / `items` / `values`, then other properties, then
  `aliases`; a field is `name`, `type`, `doc`, `default`, `order`, `aliases`, then its
  other properties);
- a primitive type without properties written as an object (`{"type": "int"}` is
  `"int"`), and attributes Java drops (`doc` on a primitive, `order: "ascending"`);
- namespaces that repeat the enclosing one, and a dotted `name` versus `name` +
  `namespace` (Java writes the short name and a `namespace` only where it changes);
- aliases written relative to their type's namespace or fully qualified;
- a named type defined again where it is already known (written as a reference).

Docs, defaults, field order, symbol order and custom properties (in their order) remain
part of the identity, as they are for Confluent.

With `normalize=true` (Confluent's "schema normalization" for register and lookup) the
text is additionally independent of how names are qualified and of the order of custom
properties: every name, reference and alias is written fully qualified (no `namespace`
attribute) and custom properties are sorted by key. The registry stores the normalized
text when a client asks for normalization, as Confluent does.

The input must already be a valid schema (the registry parses it with the Apache `avro`
package first); this module only rewrites it.
"""

from __future__ import annotations

import json
from typing import Any

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
NAMED = frozenset({"record", "error", "enum", "fixed"})
# Attributes Java Avro reads itself (org.apache.avro.Schema's reserved sets); every other
# key is a custom property, kept.
_SCHEMA_RESERVED = frozenset(
    {"doc", "fields", "items", "name", "namespace", "size", "symbols", "values", "type", "aliases"}
)
_ENUM_RESERVED = _SCHEMA_RESERVED | {"default"}
_FIELD_RESERVED = frozenset({"default", "doc", "name", "order", "type", "aliases"})


def canonical_text(doc: Any, *, normalize: bool = False) -> str:
    """The schema's identity as Confluent computes it (see the module docstring).

    Args:
        doc: a valid Avro schema as parsed JSON (dict, list or str).
        normalize: apply Confluent's `normalize=true` rules on top.

    Returns:
        Compact JSON text; two schemas are the same schema iff their texts are equal.
    """
    writer = _Writer(normalize)
    return json.dumps(writer.schema(doc, None), separators=(",", ":"), ensure_ascii=False)


def full_name(name: str, namespace: str | None) -> str:
    """Avro spec, "Names": a name containing a dot is already full."""
    if "." in name or not namespace:
        return name.lstrip(".")
    return f"{namespace}.{name}"


def _space(full: str) -> str | None:
    return full.rsplit(".", 1)[0] if "." in full else None


class _Writer:
    def __init__(self, normalize: bool) -> None:
        self.normalize = normalize
        self.known: set[str] = set()

    def _qualified(self, full: str, space: str | None) -> str:
        # Java's Name.getQualified(space): the short name inside its own namespace.
        if self.normalize or _space(full) != space or _space(full) is None:
            return full
        return full.rsplit(".", 1)[1]

    def _props(self, node: dict[str, Any], reserved: frozenset[str]) -> dict[str, Any]:
        props = {k: v for k, v in node.items() if k not in reserved}
        return dict(sorted(props.items())) if self.normalize else props

    def _reference(self, name: str, space: str | None) -> str:
        full = full_name(name, space)
        if full not in self.known and "." not in name and name in self.known:
            full = name  # a name from the null namespace, referenced inside a namespace
        return self._qualified(full, space)

    def schema(self, node: Any, space: str | None) -> Any:
        if isinstance(node, str):
            return node if node in PRIMITIVES else self._reference(node, space)
        if isinstance(node, list):
            return [self.schema(branch, space) for branch in node]
        kind = node["type"]
        if isinstance(kind, (dict, list)):
            return self.schema(kind, space)  # {"type": {...}}: the wrapper adds nothing
        if kind in PRIMITIVES:
            props = self._props(node, _SCHEMA_RESERVED)
            return {"type": kind, **props} if props else kind
        if kind in ("array", "map"):
            child = "items" if kind == "array" else "values"
            return {
                "type": kind,
                child: self.schema(node[child], space),
                **self._props(node, _SCHEMA_RESERVED),
            }
        # A named type's definition, or a reference written as {"type": "SomeRecord"}.
        return self._named(node, kind, space) if kind in NAMED else self._reference(kind, space)

    def _named(self, node: dict[str, Any], kind: str, space: str | None) -> Any:
        full = full_name(str(node["name"]), node.get("namespace", space) or None)
        if full in self.known:
            return self._qualified(full, space)
        self.known.add(full)
        own = _space(full)
        out: dict[str, Any] = {"type": kind}
        if self.normalize:
            out["name"] = full
        else:
            out["name"] = full.rsplit(".", 1)[-1]
            if own != space:
                out["namespace"] = own or ""
        if "doc" in node:
            out["doc"] = node["doc"]
        if kind in ("record", "error"):
            out["fields"] = [self._field(f, own) for f in node["fields"]]
            out.update(self._props(node, _SCHEMA_RESERVED))
        elif kind == "enum":
            out["symbols"] = node["symbols"]
            if "default" in node:
                out["default"] = node["default"]
            out.update(self._props(node, _ENUM_RESERVED))
        else:
            out["size"] = node["size"]
            out.update(self._props(node, _SCHEMA_RESERVED))
        if node.get("aliases"):
            out["aliases"] = [self._qualified(full_name(a, own), own) for a in node["aliases"]]
        return out

    def _field(self, field: dict[str, Any], space: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {"name": field["name"], "type": self.schema(field["type"], space)}
        if "doc" in field:
            out["doc"] = field["doc"]
        if "default" in field:
            out["default"] = field["default"]
        if field.get("order", "ascending") != "ascending":
            out["order"] = field["order"]
        if field.get("aliases"):
            out["aliases"] = list(field["aliases"])
        out.update(self._props(field, _FIELD_RESERVED))
        return out


def qualify_aliases(doc: Any, space: str | None = None) -> Any:
    """A copy of `doc` whose named types carry fully qualified aliases.

    The Avro specification resolves an alias of a named type against that type's
    namespace ("Aliases"), and Java's checker compares the writer's full name with the
    reader's qualified aliases. The Apache `avro` Python checker compares the alias
    strings as written, so `"aliases": ["Inner"]` inside namespace `t` never matches the
    writer's `t.Inner`. Qualifying them first gives its checker Java's inputs.
    """
    if isinstance(doc, list):
        return [qualify_aliases(branch, space) for branch in doc]
    if not isinstance(doc, dict):
        return doc
    kind = doc.get("type")
    out = dict(doc)
    if kind in NAMED:
        full = full_name(str(doc["name"]), doc.get("namespace", space) or None)
        own = _space(full)
        if isinstance(doc.get("aliases"), list):
            out["aliases"] = [full_name(str(a), own) for a in doc["aliases"]]
        if kind in ("record", "error"):
            out["fields"] = [
                {**f, "type": qualify_aliases(f["type"], own)} for f in doc.get("fields", ())
            ]
        return out
    if kind == "array":
        out["items"] = qualify_aliases(doc["items"], space)
    elif kind == "map":
        out["values"] = qualify_aliases(doc["values"], space)
    elif isinstance(kind, (dict, list)):
        out["type"] = qualify_aliases(kind, space)
    return out

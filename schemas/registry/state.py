"""The registry's state as a pure function of the `_schemas` log.

Every instance applies the same records in the same order with `RegistryState.apply`, so
every instance reaches the same state and the same verdict on every record; nothing here
touches Kafka or the clock. Records are JSON, shaped like Confluent's:

- SCHEMA  key `{"keytype":"SCHEMA","subject":s,"version":v,"magic":1,"proposal":p}`,
  value `{"subject":s,"version":v,"id":i,"schema":text,"deleted":bool}`; a null value
  (tombstone) deletes that version permanently. `proposal` is a writer-chosen nonce: two
  writers racing for the same (subject, version) write different keys, so compaction
  can never keep the loser's record in place of the winner's.
- CONFIG  key `{"keytype":"CONFIG","subject":s|null,"magic":0}`,
  value `{"compatibilityLevel":L}`; null clears the subject's level.
- DELETE_SUBJECT key `{"keytype":"DELETE_SUBJECT","subject":s,"magic":0}`,
  value `{"subject":s,"version":v}`: soft-deletes every version <= v.

A SCHEMA record that registers a new version is a proposal. It takes effect only if, at its
place in the log, its version is the subject's next one, its id is not taken by another
schema, the schema does not already own another id, and the subject does not already
hold it live. Otherwise it is void: it changes nothing and its writer retries.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "SCHEMA"
CONFIG = "CONFIG"
DELETE_SUBJECT = "DELETE_SUBJECT"


def encode(doc: dict[str, Any] | None) -> bytes | None:
    return None if doc is None else json.dumps(doc, separators=(",", ":")).encode()


def schema_key(subject: str, version: int, proposal: str) -> dict[str, Any]:
    return {
        "keytype": SCHEMA,
        "subject": subject,
        "version": version,
        "magic": 1,
        "proposal": proposal,
    }


def schema_value(
    subject: str, version: int, schema_id: int, schema: str, *, deleted: bool = False
) -> dict[str, Any]:
    return {
        "subject": subject,
        "version": version,
        "id": schema_id,
        "schema": schema,
        "deleted": deleted,
    }


def config_key(subject: str | None) -> dict[str, Any]:
    return {"keytype": CONFIG, "subject": subject, "magic": 0}


def delete_subject_key(subject: str) -> dict[str, Any]:
    return {"keytype": DELETE_SUBJECT, "subject": subject, "magic": 0}


@dataclass(frozen=True)
class Version:
    subject: str
    version: int
    id: int
    schema: str
    deleted: bool
    key: bytes  # the log key that holds this version; soft and hard deletes reuse it


@dataclass(frozen=True)
class Outcome:
    """What applying one record did. `accepted` is False for a void proposal."""

    accepted: bool
    proposal: str | None = None
    reason: str = ""


@dataclass
class RegistryState:
    subjects: dict[str, dict[int, Version]] = field(default_factory=dict)
    configs: dict[str | None, str] = field(default_factory=dict)
    # Derived indexes, kept in step by apply(): every version (live or soft-deleted)
    # that holds an id keeps that id and its schema alive.
    refs: dict[int, set[tuple[str, int]]] = field(default_factory=dict)
    schema_by_id: dict[int, str] = field(default_factory=dict)
    id_by_schema: dict[str, int] = field(default_factory=dict)
    # Highest id this instance has seen; a proposal only. Validity never depends on it,
    # because log compaction can make a replaying instance see a lower one.
    max_id: int = 0
    malformed: int = 0
    # Maps a stored schema text to its identity (the registry passes
    # `compat.stored_identity`); a pure function, so replays stay deterministic.
    identity: Callable[[str], str] = field(default=str, repr=False)

    # ---- queries -------------------------------------------------------------------

    def versions(self, subject: str, *, deleted: bool = False) -> list[Version]:
        found = self.subjects.get(subject, {})
        return [v for _, v in sorted(found.items()) if deleted or not v.deleted]

    def live_subjects(self, *, deleted: bool = False) -> list[str]:
        return sorted(s for s in self.subjects if self.versions(s, deleted=deleted))

    def next_version(self, subject: str) -> int:
        # Soft-deleted versions keep their numbers: a new version never reuses one.
        return max(self.subjects.get(subject, {}), default=0) + 1

    def next_id(self) -> int:
        return max(self.max_id, max(self.schema_by_id, default=0)) + 1

    def schema_count(self) -> int:
        return len(self.schema_by_id)

    # ---- the state machine ---------------------------------------------------------

    def apply(self, raw_key: bytes | None, raw_value: bytes | None) -> Outcome | None:
        """Apply one log record. Returns None for a record that is not ours or malformed
        (counted, never fatal: one bad record must not stop the registry)."""
        try:
            key = json.loads(raw_key) if raw_key is not None else None
            value = json.loads(raw_value) if raw_value is not None else None
            if isinstance(key, dict) and (value is None or isinstance(value, dict)):
                return self._apply(raw_key or b"", key, value)
        except (ValueError, TypeError, KeyError):
            pass
        self.malformed += 1
        return None

    def _apply(
        self, raw_key: bytes, key: dict[str, Any], value: dict[str, Any] | None
    ) -> Outcome | None:
        keytype = key.get("keytype")
        if keytype == SCHEMA:
            return self._apply_schema(raw_key, key, value)
        if keytype == CONFIG:
            subject = key.get("subject")
            if value is None:
                self.configs.pop(subject, None)
            else:
                self.configs[subject] = str(value["compatibilityLevel"])
        elif keytype == DELETE_SUBJECT and value is not None:
            self._soft_delete_subject(str(key["subject"]), int(value["version"]))
        # NOOP and key types of later versions change nothing here.
        return Outcome(True)

    def _apply_schema(
        self, raw_key: bytes, key: dict[str, Any], value: dict[str, Any] | None
    ) -> Outcome:
        subject, version = str(key["subject"]), int(key["version"])
        proposal = key.get("proposal")
        held = self.subjects.get(subject, {}).get(version)
        if value is None:
            # Tombstone: only the key that holds the version may remove it; a tombstone
            # for a void proposal's key (cleanup) removes nothing.
            if held is not None and held.key == raw_key:
                self._remove(held)
            return Outcome(True, proposal)
        if held is not None and held.key == raw_key:
            # The same record rewritten: a soft delete (deletion is one-way).
            if value.get("deleted") and not held.deleted:
                self._put(Version(subject, version, held.id, held.schema, True, raw_key))
            return Outcome(True, proposal)
        if value.get("deleted"):
            # A soft delete of a version that is gone or held by another key: nothing to do.
            return Outcome(False, proposal, f"no version {version} of {subject!r} to delete")
        schema_id, schema = int(value["id"]), self.identity(str(value["schema"]))
        reason = self._void_reason(subject, version, schema_id, schema)
        if reason:
            return Outcome(False, proposal, reason)
        self._put(Version(subject, version, schema_id, schema, False, raw_key))
        return Outcome(True, proposal)

    def _void_reason(self, subject: str, version: int, schema_id: int, schema: str) -> str:
        if version != self.next_version(subject):
            return f"version {version} of {subject!r} is not the next one"
        taken = self.schema_by_id.get(schema_id)
        if taken is not None and taken != schema:
            return f"id {schema_id} belongs to another schema"
        owned = self.id_by_schema.get(schema)
        if owned is not None and owned != schema_id:
            return f"the schema already has id {owned}"
        if any(v.schema == schema for v in self.versions(subject)):
            return f"the schema is already registered under {subject!r}"
        return ""

    def _put(self, v: Version) -> None:
        self.subjects.setdefault(v.subject, {})[v.version] = v
        self.refs.setdefault(v.id, set()).add((v.subject, v.version))
        self.schema_by_id[v.id] = v.schema
        self.id_by_schema[v.schema] = v.id
        self.max_id = max(self.max_id, v.id)

    def _remove(self, v: Version) -> None:
        versions = self.subjects[v.subject]
        del versions[v.version]
        if not versions:
            del self.subjects[v.subject]
        refs = self.refs.get(v.id, set())
        refs.discard((v.subject, v.version))
        if not refs:
            # Nothing refers to the id any more: the schema is gone (permanent delete).
            self.refs.pop(v.id, None)
            self.schema_by_id.pop(v.id, None)
            self.id_by_schema.pop(v.schema, None)

    def _soft_delete_subject(self, subject: str, up_to: int) -> None:
        for v in self.versions(subject):
            if v.version <= up_to:
                self._put(Version(v.subject, v.version, v.id, v.schema, True, v.key))

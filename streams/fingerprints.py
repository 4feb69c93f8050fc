"""Unknown single-object fingerprints → the subject's registered versions.

A device on a newer schema (one optional field added, registered under
`<topic>-value` and accepted there as FULL_TRANSITIVE) publishes a fingerprint the
bridge did not ship with. The bridge looks it up among the versions registered under
the topic's subject: only those are accepted, so the registry's compatibility check is
the gate. Bytes are hostile, so the lookups are bounded:

- found fingerprints are cached, `(subject, fingerprint) → (schema id, schema)`, at most
  `max_entries`, least recently used dropped first (ids are immutable);
- a fingerprint that a refresh did not find is cached as missing for `negative_ttl_s`;
- a subject is refreshed (its version list read, each new version fetched once) at most
  once per `refresh_interval_s`, one request at a time; a miss while the subject was
  refreshed recently is answered "not registered" without asking (counted `throttled`).

So a flood of junk fingerprints costs the registry one refresh per subject per interval.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from edgeloop.core.errors import RegistryError, SchemaError
from edgeloop.core.logs import get_logger
from edgeloop.schemas.catalog import EventSchema
from edgeloop.schemas.registry.client import SubjectVersion

log = get_logger(__name__)

SUBJECT_NOT_FOUND = 40401
VERSION_NOT_FOUND = 40402


class VersionSource(Protocol):
    """What the resolver needs of a registry client (`RegistryClient` has it)."""

    async def versions(self, subject: str) -> list[int]: ...

    async def version(self, subject: str, version: int | str = "latest") -> SubjectVersion: ...


@dataclass(frozen=True)
class Resolved:
    """A registered version's schema and the Confluent id the bridge forwards it with."""

    schema_id: int
    schema: EventSchema


class FingerprintResolver:
    """Finds the registered version of a subject whose fingerprint a message carries."""

    def __init__(
        self,
        registry: VersionSource,
        *,
        max_entries: int = 1024,
        negative_ttl_s: float = 30.0,
        refresh_interval_s: float = 5.0,
        on_result: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self.max_entries = max_entries
        self.negative_ttl_s = negative_ttl_s
        self.refresh_interval_s = refresh_interval_s
        self._on_result = on_result or (lambda _result: None)
        self._clock = clock
        self._found: OrderedDict[tuple[str, bytes], Resolved] = OrderedDict()
        self._missing: OrderedDict[tuple[str, bytes], float] = OrderedDict()  # → expiry
        # subject → when it was last refreshed, and the versions already fetched (a
        # version's schema never changes, so each is fetched once). Subjects are the
        # bridge's uplink topics: a handful.
        self._refreshed: dict[str, float] = {}
        self._seen: dict[str, dict[int, bytes]] = {}  # subject → version → fingerprint
        self._lock = asyncio.Lock()  # one registry request at a time
        self.requests = 0  # registry requests made (for tests and logs)

    @property
    def entries(self) -> tuple[int, int]:
        """How many fingerprints are cached as found and as missing."""
        return len(self._found), len(self._missing)

    async def resolve(self, subject: str, fingerprint: bytes) -> Resolved | None:
        """The version registered under `subject` with this CRC-64-AVRO fingerprint.

        Args:
            subject: the topic's subject (`<topic>-value`, TopicNameStrategy).
            fingerprint: the 8 bytes of a single-object header (Avro specification,
                "Single-object encoding").

        Returns:
            The version's id and schema, or None when it is not registered there (or the
            subject was refreshed too recently to ask again).

        Raises:
            RegistryError: the registry failed (retriable ones say so; the caller waits).
        """
        key = (subject, fingerprint)
        found = self._cached(key)
        if found is not None or self._negative(key):
            return found
        async with self._lock:
            found = self._cached(key)  # another message resolved it while we waited
            if found is not None or self._negative(key):
                return found
            last = self._refreshed.get(subject)
            if last is not None and self._clock() - last < self.refresh_interval_s:
                self._on_result("throttled")
                return None
            found = await self._refresh(subject, fingerprint)
            if found is None:
                self._remember_missing(key)
                self._on_result("unregistered")
            else:
                self._remember_found(key, found)  # the most recently used, whatever was evicted
                self._on_result("found")
            return found

    def _cached(self, key: tuple[str, bytes], *, count: bool = True) -> Resolved | None:
        found = self._found.get(key)
        if found is not None:
            self._found.move_to_end(key)
            if count:
                self._on_result("hit")
        return found

    def _negative(self, key: tuple[str, bytes]) -> bool:
        expiry = self._missing.get(key)
        if expiry is None:
            return False
        if self._clock() < expiry:
            self._on_result("negative")
            return True
        del self._missing[key]
        return False

    def _remember_missing(self, key: tuple[str, bytes]) -> None:
        self._missing[key] = self._clock() + self.negative_ttl_s
        self._missing.move_to_end(key)
        while len(self._missing) > self.max_entries:
            self._missing.popitem(last=False)

    def _remember_found(self, key: tuple[str, bytes], found: Resolved) -> None:
        self._found[key] = found
        self._found.move_to_end(key)
        self._missing.pop(key, None)
        while len(self._found) > self.max_entries:
            self._found.popitem(last=False)  # fetched again by a later refresh

    async def _refresh(self, subject: str, fingerprint: bytes) -> Resolved | None:
        """Read the subject's versions, fetch the ones not seen (or evicted) since, and
        return the one with `fingerprint` if there is one.

        A failed refresh (registry down, 5xx) does not count against the interval: the
        caller retries it with the shared policy.
        """
        self._refreshed[subject] = self._clock()
        try:
            return await self._fetch(subject, fingerprint)
        except BaseException:
            self._refreshed.pop(subject, None)
            raise

    async def _fetch(self, subject: str, fingerprint: bytes) -> Resolved | None:
        try:
            self.requests += 1
            versions = await self._registry.versions(subject)
        except RegistryError as exc:
            if exc.error_code == SUBJECT_NOT_FOUND:
                return None
            raise
        wanted: Resolved | None = None
        seen = self._seen.setdefault(subject, {})
        for number in versions:
            fp = seen.get(number)
            if fp is not None and (not fp or (subject, fp) in self._found):
                continue
            try:
                self.requests += 1
                version = await self._registry.version(subject, number)
            except RegistryError as exc:
                if exc.error_code in (SUBJECT_NOT_FOUND, VERSION_NOT_FOUND):
                    continue  # deleted between the two calls
                raise
            try:
                schema = EventSchema.from_text(version.schema)
            except SchemaError as exc:
                # Not an event record (or not parseable here): no device message can
                # carry it, so it is not a candidate, and is not fetched again.
                log.info(
                    "registered version is not an event schema",
                    extra={"subject": subject, "version": number, "error": str(exc)},
                )
                seen[number] = b""
                continue
            seen[number] = schema.fingerprint
            resolved = Resolved(version.id, schema)
            self._remember_found((subject, schema.fingerprint), resolved)
            if schema.fingerprint == fingerprint:
                wanted = resolved
        return wanted

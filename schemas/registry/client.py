"""An async client for the Confluent Schema Registry REST API, on httpx.

Works with any compatible registry (Confluent, Karapace, Apicurio's ccompat, Redpanda,
the embedded one). Ids are immutable, so `id -> schema` and `(subject, schema) -> id` are
cached for the client's life (bounded, oldest dropped first). Connection failures, 5xx,
408 and 429 are retried (`attempts` tries in all) with the shared capped, jittered
backoff of `core/retry.py`; other errors surface at once as `RegistryError` carrying
Confluent's `error_code`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from edgeloop.core.errors import RegistryError, RegistryUnavailableError
from edgeloop.core.retry import Backoff, retry
from edgeloop.core.settings import RegistrySettings
from edgeloop.schemas.registry.api import CONTENT_TYPE, SUBJECT_COMPATIBILITY_NOT_CONFIGURED

K = TypeVar("K")
V = TypeVar("V")


class _Lru(Generic[K, V]):
    """A small bounded mapping: a cache may never grow without limit."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def drop(self, match: Callable[[K], bool]) -> None:
        for key in [k for k in self._items if match(k)]:
            del self._items[key]

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


def schema_text(schema: str | dict[str, Any]) -> str:
    """The compact JSON form of a schema: what the client sends and caches by (the
    registry itself identifies schemas by Confluent's canonical string, see canonical.py)."""
    doc = json.loads(schema) if isinstance(schema, str) else schema
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class SubjectVersion:
    subject: str
    version: int
    id: int
    schema: str


@dataclass(frozen=True)
class Compatibility:
    is_compatible: bool
    messages: list[str]


class RegistryClient:
    """`async with RegistryClient(url) as registry: schema_id = await registry.register(...)`"""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 10.0,
        attempts: int = 4,
        backoff_s: float = 0.2,
        cache_size: int = 10_000,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        auth = httpx.BasicAuth(username, password or "") if username else None
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            auth=auth,
            timeout=timeout_s,
            transport=transport,
            headers={"Accept": f"{CONTENT_TYPE}, application/json", "Content-Type": CONTENT_TYPE},
        )
        self.url = url
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self._backoff = Backoff(initial_s=backoff_s, max_s=max(backoff_s, 5.0))
        self._by_id: _Lru[int, str] = _Lru(cache_size)
        self._ids: _Lru[tuple[str, str], int] = _Lru(cache_size)

    @classmethod
    def from_settings(cls, settings: RegistrySettings, **kwargs: Any) -> RegistryClient:
        password = settings.password.get_secret_value() if settings.password else None
        return cls(
            settings.url,
            username=settings.username,
            password=password,
            timeout_s=settings.timeout_s,
            **kwargs,
        )

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- the API ------------------------------------------------------------------

    async def register(self, subject: str, schema: str | dict[str, Any]) -> int:
        """Register `schema` under `subject`; the same schema always gets the same id."""
        text = schema_text(schema)
        cached = self._ids.get((subject, text))
        if cached is not None:
            return cached
        doc = await self._call(
            "POST", f"/subjects/{_q(subject)}/versions", {"schema": text, "schemaType": "AVRO"}
        )
        schema_id = int(doc["id"])
        self._ids.put((subject, text), schema_id)
        self._by_id.put(schema_id, text)
        return schema_id

    async def schema(self, schema_id: int) -> str:
        """The schema text behind `schema_id` (what a deserializer needs)."""
        cached = self._by_id.get(schema_id)
        if cached is not None:
            return cached
        doc = await self._call("GET", f"/schemas/ids/{int(schema_id)}")
        text = str(doc["schema"])
        self._by_id.put(schema_id, text)
        return text

    async def lookup(self, subject: str, schema: str | dict[str, Any]) -> SubjectVersion:
        text = schema_text(schema)
        doc = await self._call("POST", f"/subjects/{_q(subject)}", {"schema": text})
        found = _version(doc)
        self._ids.put((subject, text), found.id)
        return found

    async def version(self, subject: str, version: int | str = "latest") -> SubjectVersion:
        return _version(await self._call("GET", f"/subjects/{_q(subject)}/versions/{version}"))

    async def versions(self, subject: str) -> list[int]:
        return [int(v) for v in await self._call("GET", f"/subjects/{_q(subject)}/versions")]

    async def subjects(self) -> list[str]:
        return [str(s) for s in await self._call("GET", "/subjects")]

    async def delete_subject(self, subject: str, *, permanent: bool = False) -> list[int]:
        path = f"/subjects/{_q(subject)}" + ("?permanent=true" if permanent else "")
        self._forget(subject)
        return [int(v) for v in await self._call("DELETE", path)]

    async def delete_version(
        self, subject: str, version: int | str, *, permanent: bool = False
    ) -> int:
        path = f"/subjects/{_q(subject)}/versions/{version}"
        self._forget(subject)
        return int(await self._call("DELETE", path + ("?permanent=true" if permanent else "")))

    async def set_compatibility(self, level: str, subject: str | None = None) -> str:
        path = f"/config/{_q(subject)}" if subject else "/config"
        doc = await self._call("PUT", path, {"compatibility": level})
        return str(doc["compatibility"])

    async def compatibility(self, subject: str | None = None) -> str:
        """The level that applies to `subject` (its own, else the global one)."""
        if subject:
            try:
                doc = await self._call("GET", f"/config/{_q(subject)}?defaultToGlobal=true")
                return str(doc["compatibilityLevel"])
            except RegistryError as exc:
                # Registries without defaultToGlobal answer 40408 for "no subject level".
                if exc.error_code != SUBJECT_COMPATIBILITY_NOT_CONFIGURED:
                    raise
        return str((await self._call("GET", "/config"))["compatibilityLevel"])

    async def check(
        self, subject: str, schema: str | dict[str, Any], version: int | str = "latest"
    ) -> Compatibility:
        """Would `schema` be accepted under `subject`? Messages spell out why not."""
        path = f"/compatibility/subjects/{_q(subject)}/versions/{version}?verbose=true"
        doc = await self._call("POST", path, {"schema": schema_text(schema)})
        return Compatibility(bool(doc["is_compatible"]), [str(m) for m in doc.get("messages", [])])

    def _forget(self, subject: str) -> None:
        # A registration after a delete makes a new version: it must reach the registry.
        self._ids.drop(lambda key: key[0] == subject)

    # ---- transport ----------------------------------------------------------------

    async def _call(self, method: str, path: str, payload: Any = None) -> Any:
        # Every call here is idempotent (registering a schema twice returns its id), so a
        # retry after an ambiguous failure is safe. Which failures are retried is the one
        # policy's (core/retry.py): RegistryError says it itself (5xx, 408, 429).
        return await retry(
            lambda: self._once(method, path, payload), self._backoff, attempts=self.attempts
        )

    async def _once(self, method: str, path: str, payload: Any) -> Any:
        try:
            response = await self._http.request(
                method, path, content=None if payload is None else json.dumps(payload)
            )
        except httpx.TransportError as exc:
            raise RegistryUnavailableError(
                f"schema registry {self.url} unreachable ({method} {path}): {exc!r}"
            ) from exc
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if response.is_success:
            return doc
        if isinstance(doc, dict) and "error_code" in doc:
            raise RegistryError(
                f"{method} {path}: {doc.get('message')}",
                status=response.status_code,
                error_code=int(doc["error_code"]),
            )
        raise RegistryError(
            f"{method} {path}: HTTP {response.status_code} {response.text[:200]}",
            status=response.status_code,
            error_code=response.status_code,
        )


def _q(subject: str) -> str:
    return quote(subject, safe="")


def _version(doc: Any) -> SubjectVersion:
    return SubjectVersion(
        str(doc["subject"]), int(doc["version"]), int(doc["id"]), str(doc["schema"])
    )

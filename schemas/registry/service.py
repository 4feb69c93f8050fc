"""The embedded schema registry: Confluent's REST API on aiohttp, state in `_schemas`.

Reads answer from this instance's replica of the log. A read that finds nothing first
catches up with the log and tries once more, so a schema id minted by another instance a
moment ago resolves here too (a producer registers on one instance, a consumer on another
looks the id up).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from edgeloop.core.errors import RegistryError
from edgeloop.core.logs import get_logger
from edgeloop.core.metrics import serve_metrics
from edgeloop.schemas.registry import api
from edgeloop.schemas.registry.registry import Registry, parse_level, parse_request
from edgeloop.schemas.registry.state import Version
from edgeloop.schemas.registry.store import SchemaLog

log = get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REGISTRY_KEY = web.AppKey("registry", Registry)
# Routes that only read: on a 404 they catch up with the log and answer again.
READS = {
    "subjects",
    "versions",
    "version",
    "version_schema",
    "lookup",
    "schema_by_id",
    "id_versions",
    "id_subjects",
    "compat",
    "compat_all",
    "config_subject",
}


def reply(doc: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(doc, separators=(",", ":")), status=status, content_type=api.CONTENT_TYPE
    )


def flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "false").lower() == "true"


async def body(request: web.Request) -> Any:
    # Confluent clients send application/vnd.schemaregistry.v1+json; accept any type.
    try:
        return json.loads(await request.text())
    except json.JSONDecodeError as exc:
        raise RegistryError(
            f"request body is not JSON: {exc}", status=400, error_code=400
        ) from None


def schema_id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise api.schema_not_found(f"Schema {request.match_info['id']!r} not found") from None


def version_doc(v: Version) -> dict[str, Any]:
    return {"subject": v.subject, "version": v.version, "id": v.id, "schema": v.schema}


class Routes:
    def __init__(self, registry: Registry) -> None:
        self.r = registry

    def table(self) -> list[web.RouteDef]:
        s, v = "/subjects/{subject}", "/versions/{version}"
        return [
            web.get("/", self.root, name="root"),
            web.get("/schemas/types", self.types, name="types"),
            web.get("/schemas/ids/{id}", self.schema_by_id, name="schema_by_id"),
            web.get("/schemas/ids/{id}/versions", self.id_versions, name="id_versions"),
            web.get("/schemas/ids/{id}/subjects", self.id_subjects, name="id_subjects"),
            web.get("/subjects", self.subjects, name="subjects"),
            web.post(s, self.lookup, name="lookup"),
            web.delete(s, self.delete_subject, name="delete_subject"),
            web.get(f"{s}/versions", self.versions, name="versions"),
            web.post(f"{s}/versions", self.register, name="register"),
            web.get(f"{s}{v}", self.version, name="version"),
            web.get(f"{s}{v}/schema", self.version_schema, name="version_schema"),
            web.delete(f"{s}{v}", self.delete_version, name="delete_version"),
            web.post(f"/compatibility{s}{v}", self.compat, name="compat"),
            web.post(f"/compatibility{s}/versions", self.compat, name="compat_all"),
            web.get("/config", self.get_config, name="config"),
            web.put("/config", self.put_config, name="put_config"),
            web.delete("/config", self.delete_config, name="delete_config"),
            web.get("/config/{subject}", self.get_config, name="config_subject"),
            web.put("/config/{subject}", self.put_config, name="put_config_subject"),
            web.delete("/config/{subject}", self.delete_config, name="delete_config_subject"),
        ]

    async def root(self, _: web.Request) -> web.Response:
        return reply({})

    async def types(self, _: web.Request) -> web.Response:
        return reply(["AVRO"])

    async def schema_by_id(self, request: web.Request) -> web.Response:
        return reply({"schema": self.r.schema_by_id(schema_id(request))})

    async def id_versions(self, request: web.Request) -> web.Response:
        found = self.r.id_versions(schema_id(request), deleted=flag(request, "deleted"))
        return reply([{"subject": v.subject, "version": v.version} for v in found])

    async def id_subjects(self, request: web.Request) -> web.Response:
        found = self.r.id_versions(schema_id(request), deleted=flag(request, "deleted"))
        return reply(sorted({v.subject for v in found}))

    async def subjects(self, request: web.Request) -> web.Response:
        return reply(self.r.state.live_subjects(deleted=flag(request, "deleted")))

    async def versions(self, request: web.Request) -> web.Response:
        found = self.r.versions(request.match_info["subject"], deleted=flag(request, "deleted"))
        return reply([v.version for v in found])

    async def version(self, request: web.Request) -> web.Response:
        return reply(version_doc(self._version(request)))

    async def version_schema(self, request: web.Request) -> web.Response:
        return web.Response(text=self._version(request).schema, content_type=api.CONTENT_TYPE)

    def _version(self, request: web.Request) -> Version:
        number = api.parse_version(request.match_info["version"])
        return self.r.version(
            request.match_info["subject"], number, deleted=flag(request, "deleted")
        )

    async def lookup(self, request: web.Request) -> web.Response:
        normalize = flag(request, "normalize")
        schema = parse_request(await body(request), normalize=normalize)
        found = self.r.lookup(
            request.match_info["subject"],
            schema,
            deleted=flag(request, "deleted"),
            normalize=normalize,
        )
        return reply(version_doc(found))

    async def register(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        normalize = flag(request, "normalize")
        schema = parse_request(await body(request), normalize=normalize)
        done = await self.r.register(subject, schema, normalize=normalize)
        return reply(
            {"id": done.id, "subject": subject, "version": done.version, "schema": schema.text}
        )

    async def delete_subject(self, request: web.Request) -> web.Response:
        return reply(
            await self.r.delete_subject(
                request.match_info["subject"], permanent=flag(request, "permanent")
            )
        )

    async def delete_version(self, request: web.Request) -> web.Response:
        number = api.parse_version(request.match_info["version"])
        return reply(
            await self.r.delete_version(
                request.match_info["subject"], number, permanent=flag(request, "permanent")
            )
        )

    async def compat(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        number = api.parse_version(request.match_info.get("version", "latest"))
        schema = parse_request(await body(request), normalize=flag(request, "normalize"))
        if number != api.LATEST:
            self.r.versions(subject)  # 40401 before 40402, as Confluent orders them
        problems = self.r.check(subject, schema, number)
        doc: dict[str, Any] = {"is_compatible": not problems}
        if flag(request, "verbose"):
            doc["messages"] = [str(p) for p in problems]
        return reply(doc)

    async def get_config(self, request: web.Request) -> web.Response:
        subject = request.match_info.get("subject")
        if (
            subject is not None
            and subject not in self.r.state.configs
            and not flag(request, "defaultToGlobal")
        ):
            raise api.compatibility_not_configured(subject)
        return reply({"compatibilityLevel": self.r.level(subject).value})

    async def put_config(self, request: web.Request) -> web.Response:
        doc = await body(request)
        if not isinstance(doc, dict) or "compatibility" not in doc:
            raise api.invalid_compatibility(doc)
        level = parse_level(doc["compatibility"])
        await self.r.set_level(request.match_info.get("subject"), level)
        return reply({"compatibility": level.value})

    async def delete_config(self, request: web.Request) -> web.Response:
        previous = await self.r.clear_level(request.match_info.get("subject"))
        return reply({"compatibilityLevel": previous.value})


class Metrics:
    def __init__(self, registry: Registry) -> None:
        self.collectors = CollectorRegistry()
        self.requests = Counter(
            "edgeloop_registry_requests_total",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.collectors,
        )
        schemas = Gauge(
            "edgeloop_registry_schemas", "Distinct schemas (ids) held", registry=self.collectors
        )
        schemas.set_function(registry.state.schema_count)
        subjects = Gauge(
            "edgeloop_registry_subjects", "Subjects with a live version", registry=self.collectors
        )
        subjects.set_function(lambda: len(registry.state.live_subjects()))
        malformed = Gauge(
            "edgeloop_registry_malformed_records",
            "Records in the log that could not be applied",
            registry=self.collectors,
        )
        malformed.set_function(lambda: registry.state.malformed)


def build_app(registry: Registry, metrics: Metrics) -> web.Application:
    @web.middleware
    async def confluent_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name or "unknown"
        try:
            try:
                response = await handler(request)
            except RegistryError as exc:
                if exc.status != 404 or route not in READS:
                    raise
                await registry.store.sync()
                response = await handler(request)
        except RegistryError as exc:
            response = reply({"error_code": exc.error_code, "message": str(exc)}, exc.status)
        except web.HTTPException as exc:
            # Unknown route or method: Confluent answers with the HTTP status as the code.
            response = reply({"error_code": exc.status, "message": exc.reason}, exc.status)
        except Exception:
            log.exception("registry request failed", extra={"route": route})
            response = reply(
                {
                    "error_code": api.BACKEND_STORE_ERROR,
                    "message": "internal error, see the registry log",
                },
                500,
            )
        metrics.requests.labels(route, request.method, str(response.status)).inc()
        return response

    app = web.Application(middlewares=[confluent_errors])
    app[REGISTRY_KEY] = registry
    app.add_routes(Routes(registry).table())
    return app


class RegistryService:
    """`edgeloop registry`: serves until cancelled; state lives in the Kafka topic."""

    name = "registry"

    def __init__(
        self,
        bootstrap: str,
        *,
        host: str = "127.0.0.1",
        port: int = 8081,
        topic: str = "_schemas",
        metrics_port: int | None = None,
        timeout_s: float = 10.0,
        shutdown_timeout_s: float = 5.0,
    ) -> None:
        self.bootstrap, self.topic, self.timeout_s = bootstrap, topic, timeout_s
        self.host, self.port, self.metrics_port = host, port, metrics_port
        self.shutdown_timeout_s = shutdown_timeout_s
        self.serving = asyncio.Event()

    async def run(self) -> None:
        # Exit order (reverse): HTTP server first, then the tail, then the Kafka clients.
        async with (
            SchemaLog(self.bootstrap, self.topic, timeout_s=self.timeout_s) as store,
            asyncio.TaskGroup() as tg,
            AsyncExitStack() as stack,
        ):
            tg.create_task(store.tail(), name="registry-tail")
            # Serve nothing before the log is replayed: an id must never be answered 404
            # (or proposed again) only because this instance has not read it yet.
            await store.ready.wait()
            if swept := await store.sweep():
                log.info("tombstoned void proposals left in the log", extra={"records": swept})
            registry = Registry(store)
            metrics = Metrics(registry)
            if self.metrics_port is not None:
                await stack.enter_async_context(
                    serve_metrics(metrics.collectors, self.host, self.metrics_port)
                )
            runner = web.AppRunner(
                build_app(registry, metrics),
                handle_signals=False,
                shutdown_timeout=self.shutdown_timeout_s,
            )
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, self.host, self.port).start()
            # --port 0 lets the OS choose; report the port actually bound.
            self.port = int(runner.addresses[0][1]) if runner.addresses else self.port
            self.serving.set()
            log.info(
                "registry listening",
                extra={
                    "url": f"http://{self.host}:{self.port}",
                    "topic": self.topic,
                    "schemas": store.state.schema_count(),
                },
            )
            await asyncio.Event().wait()  # until cancelled; the stack closes the server

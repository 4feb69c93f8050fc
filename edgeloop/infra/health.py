"""Live health of a component described by a row of infra/state.json (for `status`).

`status` runs in another process than the supervisor, so it cannot ask the objects; it
probes the endpoints the way a client would.
"""

from __future__ import annotations

from typing import Any

import httpx

from edgeloop.infra.kafka import metadata_ok
from edgeloop.infra.ports import LOOPBACK, is_listening


async def component_healthy(row: dict[str, Any]) -> bool:
    kind = row.get("kind")
    if kind == "mqtt":
        return all(is_listening(int(port), LOOPBACK) for port in row.get("ports", []))
    if kind == "kafka":
        bootstrap = str(row.get("bootstrap", ""))
        host, _, port = bootstrap.partition(",")[0].rpartition(":")
        if not port.isdigit() or not is_listening(int(port), host or LOOPBACK):
            return False
        return await metadata_ok(bootstrap)
    if kind == "http":
        try:
            async with httpx.AsyncClient(timeout=3.0) as client:
                response = await client.get(str(row["url"]))
        except httpx.HTTPError:
            return False
        return response.status_code == 200
    return False

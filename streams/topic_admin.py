"""Creates the Kafka topics of the topic map, with compaction where the map says so."""

from __future__ import annotations

import contextlib

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from edgeloop.core.logs import get_logger
from edgeloop.schemas.topics import all_topics

__all__ = ["all_topics", "ensure_topics"]

log = get_logger(__name__)


async def ensure_topics(bootstrap: str, partitions: int = 6, replication: int = 1) -> list[str]:
    """Create the missing topics; returns the names created. Existing ones are left alone."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="edgeloop-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                name,
                num_partitions=partitions,
                replication_factor=replication,
                topic_configs={"cleanup.policy": "compact" if compacted else "delete"},
            )
            for name, compacted in all_topics().items()
            if name not in existing
        ]
        if wanted:
            # Another process may win the race to create a topic: that is fine.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
            log.info("topics created", extra={"count": len(wanted)})
        return [t.name for t in wanted]
    finally:
        await admin.close()

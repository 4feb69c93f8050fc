"""A Faust app's changelog topics kept in its producer's metadata (see `track_topics`).

Faust's table writes find their changelog's partitions in the producer's metadata
synchronously; a changelog missing from it fails every write to its table.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiokafka.errors import KafkaError

from edgeloop.core.logs import get_logger

log = get_logger(__name__)


async def track_topics(producer: Any, topics: Iterable[str]) -> list[str]:
    """Make the producer's metadata cover each of `topics` that exists, now and at each
    refresh.

    aiokafka's client asks the broker for all topics while its tracked set is empty, and
    only for the tracked set once any topic was added; a topic is added when a `send`
    (or `send_batch`, `partitions_for`) finds it missing from the metadata. Faust's table
    writes need their changelog topic's partitions synchronously (`key_partition`, no
    wait on metadata) and raise a TypeError while they are missing. So a worker whose
    producer started before its changelog topics existed, and then sent to a topic it did
    not know yet, never learned them: every dedupe and control state write failed for the
    rest of its life (seen in a kill test on Apache Kafka: 146 failed writes over 50 s;
    after the kill that worker's own dedupe windows were missing and replayed events were
    enriched again). Tracking the changelogs removes that state. Only topics that exist
    are tracked: asking for a missing one makes a broker with `auto.create.topics.enable`
    create it with its defaults.

    Args:
        producer: the started `AIOKafkaProducer`.
        topics: the topics to keep in the metadata (Faust's changelogs).

    Returns:
        The topics that do not exist (not tracked).

    Raises:
        KafkaError: the metadata could not be read (the broker is down); retriable.
    """
    topics = list(topics)  # read twice below
    client = producer.client
    existing = (await client.fetch_all_metadata()).topics()
    missing = sorted(t for t in topics if t not in existing)
    for topic in topics:
        if topic in existing:
            client.add_topic(topic)
    await client.force_metadata_update()
    return missing


class ChangelogTracking:
    """Keeps a Faust app's changelog topics in its producer's metadata (`track_topics`):
    once at start, then every few seconds for those that did not exist yet."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.untracked = [t.changelog_topic.get_topic_name() for t in app.tables.values()]
        self.checked = False

    async def track(self) -> None:
        """Track the changelogs not tracked yet; log those still missing.

        Raises:
            KafkaError: the metadata could not be read (retriable).
        """
        missing = await track_topics(self.app.producer._ensure_producer(), self.untracked)
        if missing:
            log.warning(
                "changelog topics not found; their table writes fail until they exist",
                extra={"topics": missing},
            )
        self.untracked, self.checked = missing, True

    async def track_again(self) -> None:
        """A timer's body: `track` while some changelog is missing; never raises."""
        if self.checked and self.untracked:
            try:
                await self.track()
            except KafkaError as exc:  # the broker is down: the next tick tries again
                log.info("changelog tracking deferred", extra={"error": repr(exc)})

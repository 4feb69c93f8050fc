"""What `edgeloop bridge` and `edgeloop train serve` check before a client of theirs asks
Kafka for a topic: that every topic they read or write exists (a broker auto-creates a
missing one with its own partition count and cleanup policy). The refusal on a real
broker: tests/integration/test_services_preflight.py."""

from __future__ import annotations

import pytest

from edgeloop.core.errors import ConfigError
from edgeloop.schemas.topics import check_topics_exist
from edgeloop.streams.bridge import bridge_topics
from edgeloop.streams.settings import BridgeSettings
from edgeloop.streams.topic_admin import all_topics
from edgeloop.trainer.serve_settings import TrainerServeSettings
from edgeloop.trainer.trigger_consumer import serve_topics


def test_missing_topics_are_named_in_one_line_with_topics_create() -> None:
    needed = {"edge.status.v1", "edge.inference.v1", "fleet.devices.v1"}
    check_topics_exist(needed, {*needed, "other"}, who="the bridge reads or writes")
    with pytest.raises(ConfigError) as caught:
        check_topics_exist(needed, {"fleet.devices.v1"}, who="the bridge reads or writes")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "the topics the bridge reads or writes do not exist yet: "
        "edge.inference.v1, edge.status.v1; create them first with `edgeloop topics create`"
    ), message
    assert "auto-creates" in message, message


def test_a_service_with_its_own_partition_count_names_it_in_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"`edgeloop topics create --partitions 12`"):
        check_topics_exist({"a"}, {}, who="the agents read", partitions=12)


@pytest.mark.parametrize(
    ("uplink", "downlink", "some", "none_of"),
    [
        (True, True, {"edge.inference.v1", "edge.uplink.dlq.v1", "fleet.devices.v1"}, set()),
        (
            True,
            False,
            {"edge.inference.v1", "edge.offload.dlq.v1", "edge.uplink.dlq.v1"},
            {"fleet.devices.v1", "control.thresholds.v1"},
        ),
        (
            False,
            True,
            {"fleet.devices.v1", "cloud.verdicts.v1", "ml.model-releases.dlq.v1"},
            {"edge.inference.v1", "edge.uplink.dlq.v1"},
        ),
    ],
    ids=["both", "uplink", "downlink"],
)
def test_the_bridge_needs_the_topics_of_the_sides_it_runs(
    uplink: bool, downlink: bool, some: set[str], none_of: set[str]
) -> None:
    topics = bridge_topics(BridgeSettings(uplink=uplink, downlink=downlink))
    assert some <= topics and not none_of & topics, topics
    # Each is one `topics create` makes: otherwise the bridge could never start.
    assert topics <= all_topics().keys(), topics - all_topics().keys()


def test_train_serve_needs_its_triggers_their_dead_letters_and_the_releases() -> None:
    topics = serve_topics(TrainerServeSettings())
    assert topics == {
        "ml.training-triggers.v1",
        "ml.training-triggers.dlq.v1",
        "ml.model-releases.v1",
    }
    assert topics <= all_topics().keys()
    custom = TrainerServeSettings(triggers_topic="t.triggers.v1", releases_topic="t.releases.v1")
    assert serve_topics(custom) == {"t.triggers.v1", "t.triggers.dlq.v1", "t.releases.v1"}


def test_a_topic_outside_the_topic_map_is_left_to_the_operators_tools() -> None:
    """`topics create` makes only the topic map's topics: advising it for a topic renamed
    by a setting (EDGELOOP_TRAINER_TRIGGERS_TOPIC=my.triggers) could never help."""
    with pytest.raises(ConfigError) as caught:
        check_topics_exist(
            {"my.triggers", "ml.model-releases.v1", "ml.training-triggers.dlq.v1"},
            set(),
            who="`train serve` reads or writes",
        )
    message = str(caught.value)
    assert "(my.triggers not in edgeloop's topic map: create it with your Kafka tools)" in (
        message
    ), message
    # The map's own topics, dead letters included, are still `topics create`'s.
    assert "ml.model-releases.v1" not in message.split("(")[1], message
    with pytest.raises(ConfigError) as only_map:
        check_topics_exist({"edge.uplink.dlq.v1", "edge.status.dlq.v1"}, set(), who="x")
    assert "Kafka tools" not in str(only_map.value)

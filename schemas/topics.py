"""Kafka topics and MQTT topics: names, the event each carries, and their keys.

Names end in the schema's major version (`.v1`), so an incompatible change is a new topic.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import StrEnum

from edgeloop.core.errors import ConfigError


@dataclass(frozen=True)
class TopicSpec:
    name: str
    event: str  # full schema name
    compacted: bool = False
    key: str = "device_id"
    # Fleet topics carry what devices (which upgrade late) write or read: FULL_TRANSITIVE.
    fleet: bool = False


def _spec(name: str, event: str, **kw: bool | str) -> tuple[str, TopicSpec]:
    return name, TopicSpec(name, f"edgeloop.v1.{event}", **kw)  # type: ignore[arg-type]


TOPICS: dict[str, TopicSpec] = dict(
    [
        _spec("edge.inference.v1", "InferenceEvent", fleet=True),
        _spec("edge.offload.v1", "OffloadRequest", fleet=True),
        _spec("edge.status.v1", "DeviceStatus", fleet=True),
        _spec("fleet.devices.v1", "DeviceRecord", compacted=True),
        _spec("edge.inference.enriched.v1", "EnrichedInferenceEvent"),
        _spec("cloud.verdicts.v1", "CloudVerdict", fleet=True),
        _spec("ml.hard-examples.v1", "HardExample"),
        _spec("ml.signals.v1", "StreamSignal", key="scope_id"),
        _spec(
            "control.thresholds.v1", "ThresholdUpdate", compacted=True, key="scope_id", fleet=True
        ),
        _spec("ml.training-triggers.v1", "TrainingTrigger", key="model_name"),
        _spec("ml.model-releases.v1", "ModelRelease", compacted=True, key="cohort", fleet=True),
    ]
)


# Dead letters of uplink messages whose MQTT topic names no known kind.
UPLINK_DLQ = "edge.uplink.dlq.v1"


def dlq_topic(topic: str) -> str:
    """`edge.inference.v1` -> `edge.inference.dlq.v1`."""
    base, _, version = topic.rpartition(".")
    return f"{base}.dlq.{version}"


def all_topics() -> dict[str, bool]:
    """Topic name -> compacted, for every topic edgeloop uses (dead-letter topics too):
    what `edgeloop topics create` makes."""
    topics = {spec.name: spec.compacted for spec in TOPICS.values()}
    topics |= {dlq_topic(name): False for name in list(topics)}
    topics[UPLINK_DLQ] = False
    return topics


def check_topics_exist(
    needed: Iterable[str], existing: Collection[str], *, who: str, partitions: int | None = None
) -> None:
    """Refuse to start a service before the topics it reads or writes exist.

    A client that asks for a missing topic's metadata (a consumer's subscription, a
    producer's first send or `partitions_for`) has the broker auto-create it (both
    embedded brokers allow it, as Kafka does by default) with the broker's partition
    count and `delete` cleanup, not the topic map's: the agents' co-partitioning, or a
    compacted topic, broken from the first record with no error anywhere. `existing`
    must come from a metadata request for all topics (`require_kafka_answering`), which
    creates none.

    Args:
        needed: the topics the service reads or writes.
        existing: the topic names the cluster has.
        who: what needs them, for the message ("the bridge reads or writes").
        partitions: the count `edgeloop topics create` is to be run with, when the
            service has one of its own (the agents' EDGELOOP_AGENTS_PARTITIONS).

    Raises:
        ConfigError: naming the missing topics and `edgeloop topics create`.
    """
    missing = sorted(set(needed).difference(existing))
    if missing:
        create = "edgeloop topics create"
        if partitions is not None:
            create += f" --partitions {partitions}"
        # `topics create` makes the topic map's topics only: one renamed by a setting is
        # the operator's to create.
        in_map = all_topics()
        own = [t for t in missing if t not in in_map]
        how = f"with `{create}`"
        if own:
            how += (
                f" ({', '.join(own)} not in edgeloop's topic map: create "
                f"{'it' if len(own) == 1 else 'them'} with your Kafka tools)"
            )
        raise ConfigError(
            f"the topics {who} do not exist yet: {', '.join(missing)}; create them first "
            f"{how} (a topic the broker auto-creates gets its default partition "
            f"count and cleanup policy, not edgeloop's)"
        )


def subject_for(topic: str) -> str:
    """Confluent TopicNameStrategy: the value schema of `topic` lives under `<topic>-value`."""
    return f"{topic}-value"


class UplinkKind(StrEnum):
    INFERENCE = "inference"
    OFFLOAD = "offload"
    STATUS = "status"


class DownlinkKind(StrEnum):
    THRESHOLD = "threshold"
    MODEL = "model"
    VERDICT = "verdict"


UPLINK_TOPIC: dict[UplinkKind, str] = {
    UplinkKind.INFERENCE: "edge.inference.v1",
    UplinkKind.OFFLOAD: "edge.offload.v1",
    UplinkKind.STATUS: "edge.status.v1",
}

MQTT_PREFIX = "edgeloop"


def mqtt_uplink(device_id: str, kind: UplinkKind) -> str:
    return f"{MQTT_PREFIX}/{_device(device_id)}/up/{kind.value}"


def mqtt_downlink(device_id: str, kind: DownlinkKind) -> str:
    return f"{MQTT_PREFIX}/{_device(device_id)}/down/{kind.value}"


def parse_mqtt_uplink(topic: str) -> tuple[str, UplinkKind]:
    """`edgeloop/<device>/up/<kind>` -> (device, kind); ConfigError names what is wrong."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != MQTT_PREFIX or parts[2] != "up":
        raise ConfigError(f"topic {topic!r} is not of the form {MQTT_PREFIX}/<device>/up/<kind>")
    try:
        return parts[1], UplinkKind(parts[3])
    except ValueError:
        kinds = ", ".join(k.value for k in UplinkKind)
        raise ConfigError(f"topic {topic!r}: unknown uplink kind {parts[3]!r} ({kinds})") from None


def level_problem(value: object) -> str | None:
    """Why `value` cannot be one level of an MQTT topic name, or None when it can.

    MQTT 5 section 4.7: `/` separates levels and `+`/`#` are wildcards, never allowed in
    a topic name; section 1.5.4: a UTF-8 string must not contain U+0000 and should not
    contain other control characters, and must be valid UTF-8 (no lone surrogates).
    Beyond the specification, edgeloop ids are non-empty, at most 128 characters and
    never contain `$` (schemas/topics.py builds the topics with the same rule).
    """
    if not isinstance(value, str) or not value:
        return "is empty"
    if len(value) > 128:
        return f"is {len(value)} characters long (at most 128)"
    bad = sorted({c for c in value if c in "/+#$" or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F})
    if bad:
        return "contains " + ", ".join(repr(c) for c in bad)
    try:
        value.encode()
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


def _device(device_id: str) -> str:
    problem = level_problem(device_id)
    if problem is not None:
        raise ConfigError(f"device_id {device_id!r} {problem}: it cannot be an MQTT topic level")
    return device_id

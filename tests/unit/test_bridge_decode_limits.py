"""The bridge's decode limits are one setting for both directions: a narrowed timestamp
window dead-letters downlink records too, and an empty window is refused at start-up
(it would dead-letter every event)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from edgeloop.core.errors import ConfigError, DecodeError
from edgeloop.core.settings import KafkaSettings, MqttSettings
from edgeloop.schemas import catalog
from edgeloop.schemas.samples import example_record
from edgeloop.streams.downlink import Downlink
from edgeloop.streams.metrics import BridgeMetrics
from edgeloop.streams.settings import BridgeSettings

YEAR_2100_US = 4_102_444_800 * 1_000_000


def test_an_empty_timestamp_window_is_refused_naming_both_bounds() -> None:
    with pytest.raises(ConfigError, match=r"min_timestamp_us=10 > max_timestamp_us=5"):
        BridgeSettings(min_timestamp_us=10, max_timestamp_us=5)


def test_the_downlink_decodes_with_the_configured_timestamp_window() -> None:
    settings = BridgeSettings(max_timestamp_us=YEAR_2100_US)
    registry: Any = None  # every schema id used here is known to the codec already
    downlink = Downlink(settings, MqttSettings(), KafkaSettings(), registry, BridgeMetrics())
    schema = catalog.get("edgeloop.v1.ThresholdUpdate")
    downlink.confluent.add(7, schema)
    good = {**example_record(schema), "ts": 1_700_000_000_000_000}
    late = {**good, "ts": YEAR_2100_US + 1}

    _, record = asyncio.run(downlink._decode(downlink.confluent.encode(7, schema, good)))
    assert record["ts"] == good["ts"]
    with pytest.raises(DecodeError) as caught:
        asyncio.run(downlink._decode(downlink.confluent.encode(7, schema, late)))
    assert caught.value.reason == "bad_timestamp"

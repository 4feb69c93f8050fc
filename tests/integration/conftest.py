"""Fixtures for integration tests beyond the servers in tests/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.bridge_support import BridgeProcess


@pytest.fixture
def bridges() -> Iterator[list[BridgeProcess]]:
    """Bridge processes a test starts; each is stopped (SIGTERM) after the test."""
    started: list[BridgeProcess] = []
    yield started
    for bridge in started:
        bridge.stop()

"""`Settings.load`: the endpoints file of the home it is given, and overrides that win,
including a field named `home` (the trainer's), which `train serve --out` sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeloop.core.settings import KafkaSettings, endpoints_file
from edgeloop.trainer.serve_settings import TrainerServeSettings


def test_train_serve_out_sets_the_trainer_home(tmp_path: Path) -> None:
    # `train serve --out DIR` passes home=DIR; it used to bind to load's own first
    # parameter (where the endpoints file is) and the trainer used its default home.
    settings = TrainerServeSettings.load(home=tmp_path / "trainer")
    assert settings.home == tmp_path / "trainer"


def test_the_endpoints_file_of_the_given_home_is_read_and_overrides_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGELOOP_KAFKA_BOOTSTRAP", raising=False)
    endpoints_file(tmp_path).parent.mkdir(parents=True, exist_ok=True)
    endpoints_file(tmp_path).write_text("EDGELOOP_KAFKA_BOOTSTRAP=127.0.0.1:19092\n")
    assert KafkaSettings.load(tmp_path).bootstrap == "127.0.0.1:19092"
    assert KafkaSettings.load(tmp_path, bootstrap="127.0.0.1:29092").bootstrap == (
        "127.0.0.1:29092"
    )

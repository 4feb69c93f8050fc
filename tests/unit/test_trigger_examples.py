"""HardExample events -> HardExampleSet, and the static checks of a trigger's ranges."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pytest

from edgeloop.core.errors import DecodeError
from edgeloop.trainer.hard_example_source import (
    OffsetRange,
    TriggerRejectedError,
    check_ranges,
    decode_input,
    to_example_set,
    trainer_reason,
)

SHAPE = (1, 8, 8)


def _record(x: np.ndarray, encoding: str = "F32_RAW", **over: Any) -> dict[str, Any]:
    body = x.astype("<f4").tobytes()
    rec = {
        "input": zlib.compress(body) if encoding == "F32_ZLIB" else body,
        "input_encoding": encoding,
        "input_shape": list(SHAPE),
        "label": 3,
        "reasons": ["LOW_CONFIDENCE"],
        "_source": "hard/0@7",
    }
    return rec | over


def test_raw_and_zlib_inputs_decode_to_the_same_tensor() -> None:
    x = np.random.default_rng(0).random(SHAPE, dtype=np.float32) - 0.5
    np.testing.assert_array_equal(decode_input(_record(x), SHAPE), x)
    np.testing.assert_array_equal(decode_input(_record(x, "F32_ZLIB"), SHAPE), x)


@pytest.mark.parametrize(
    ("over", "reason", "words"),
    [
        ({"input_shape": [1, 8, 9]}, "bad_input", r"input_shape \[1, 8, 9\]"),
        ({"input": b"\x00" * 12}, "bad_input", "needs 256"),
        ({"input_encoding": "JPEG"}, "unsupported_encoding", "JPEG"),
        ({"input_encoding": "F32_ZLIB", "input": b"not zlib"}, "bad_input", "zlib"),
        # A zip bomb: 64 MB of zeros in ~64 kB; inflating stops after the 257th byte.
        (
            {"input_encoding": "F32_ZLIB", "input": zlib.compress(bytes(64 << 20))},
            "bad_input",
            "needs 256",
        ),
        ({"input": np.full(64, np.nan, "<f4").tobytes()}, "bad_input", "NaN"),
    ],
)
def test_bad_inputs_name_what_is_wrong(over: dict[str, Any], reason: str, words: str) -> None:
    with pytest.raises(DecodeError, match=words) as err:
        decode_input(_record(np.zeros(SHAPE, np.float32), **over), SHAPE)
    assert err.value.reason == reason


def test_reasons_map_to_the_trainers_vocabulary_disagreement_first() -> None:
    assert trainer_reason(["AUDIT", "DISAGREE"]) == "disagreement"
    assert trainer_reason(["HIGH_ENTROPY"]) == "low_confidence"
    assert trainer_reason(["AUDIT"]) == "audit"
    with pytest.raises(DecodeError, match="none the trainer knows"):
        trainer_reason(["UNKNOWN"])


def test_example_set_keeps_order_labels_and_counts() -> None:
    xs = [np.full(SHAPE, i / 10, np.float32) for i in range(5)]
    recs = [_record(x, "F32_ZLIB" if i % 2 else "F32_RAW", label=i) for i, x in enumerate(xs)]
    got = to_example_set(recs, SHAPE, 10)
    assert len(got) == 5
    np.testing.assert_array_equal(got.x, np.stack(xs))
    assert got.label.tolist() == [0, 1, 2, 3, 4]
    assert set(got.reason.tolist()) == {"low_confidence"}


def test_one_bad_record_rejects_the_trigger_naming_its_offset() -> None:
    recs = [_record(np.zeros(SHAPE, np.float32)), _record(np.zeros(SHAPE), label=12)]
    with pytest.raises(TriggerRejectedError, match=r"hard/0@7: label 12 is outside 0..9") as err:
        to_example_set(recs, SHAPE, 10)
    assert err.value.reason == "bad_hard_example"


@pytest.mark.parametrize(
    ("ranges", "reason"),
    [
        ([], "empty_range"),
        ([OffsetRange("h", 0, 5, 5)], "empty_range"),
        ([OffsetRange("h", 0, 9, 5)], "empty_range"),
        ([OffsetRange("h", 0, -1, 5)], "bad_range"),
        ([OffsetRange("h", 0, 0, 10), OffsetRange("h", 0, 5, 12)], "bad_range"),
        ([OffsetRange("h", 0, 0, 600), OffsetRange("h", 1, 0, 500)], "too_many_examples"),
    ],
)
def test_bad_ranges_are_rejected_before_reading(ranges: list[OffsetRange], reason: str) -> None:
    with pytest.raises(TriggerRejectedError) as err:
        check_ranges(ranges, max_examples=1000)
    assert err.value.reason == reason


def test_adjacent_ranges_and_other_partitions_are_fine() -> None:
    check_ranges(
        [OffsetRange("h", 0, 0, 10), OffsetRange("h", 0, 10, 20), OffsetRange("h", 1, 0, 10)],
        max_examples=30,
    )

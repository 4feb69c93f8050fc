"""The shipped task: fixed splits, preprocessing, plug-in protocol, torch-free edge imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgeloop.core.errors import ConfigError
from edgeloop.tasks.base import Split, Task, accuracy
from edgeloop.tasks.digits import DigitsTask, get_task
from edgeloop.trainer.hard_examples import HardExampleSet, select_hard


@pytest.fixture(scope="module")
def task() -> DigitsTask:
    return get_task("digits")


def test_digits_implements_the_task_protocol(task: DigitsTask) -> None:
    assert isinstance(task, Task)


def test_splits_are_deterministic_and_sized(task: DigitsTask) -> None:
    a, b = task.splits(seed=0), task.splits(seed=0)
    assert np.array_equal(a.train.x, b.train.x)
    assert np.array_equal(a.drifted_holdout.x, b.drifted_holdout.x)
    assert (len(a.train), len(a.clean_holdout), len(a.drifted_holdout)) == (1078, 359, 360)
    assert len(a.field_pool) == len(a.train)
    assert not np.array_equal(a.train.y, task.splits(seed=1).train.y)


def test_holdout_images_are_never_in_train(task: DigitsTask) -> None:
    s = task.splits(seed=0)
    train_rows = {row.tobytes() for row in s.train.x}
    assert not any(row.tobytes() in train_rows for row in s.clean_holdout.x)


def test_drifted_holdout_really_drifted(task: DigitsTask) -> None:
    s = task.splits(seed=0)
    # Brightness shift: drifted images are brighter on average than clean ones.
    assert s.drifted_holdout.x.mean() > s.clean_holdout.x.mean() + 0.02


def test_preprocess_shape_and_range(task: DigitsTask) -> None:
    x = task.preprocess(np.ones((3, 8, 8)) * 2.0)
    assert x.shape == (3, 1, 8, 8)
    assert x.dtype == np.float32
    assert float(x.max()) == 0.5  # clipped to [0, 1] then centred
    with pytest.raises(ValueError, match=r"\(N, 8, 8\)"):
        task.preprocess(np.zeros((3, 28, 28)))


def test_unknown_task_named_in_error() -> None:
    with pytest.raises(ValueError, match="'mnist'"):
        get_task("mnist")


def test_split_length_mismatch_refused() -> None:
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        Split("x", np.zeros((3, 1, 8, 8), np.float32), np.zeros(2, np.int64))


def test_accuracy_from_logits_and_labels() -> None:
    y = np.array([0, 1, 2])
    assert accuracy(np.array([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]]), y) == pytest.approx(2 / 3)
    assert accuracy(np.array([0, 1, 2]), y) == 1.0


def test_select_hard_keeps_disagreement_and_low_confidence() -> None:
    x = np.zeros((3, 1, 8, 8), np.float32)
    student = np.array([[0.9, 0.1], [0.55, 0.45], [0.95, 0.05]], np.float32)
    teacher = np.array([[0.1, 0.9], [0.9, 0.1], [0.9, 0.1]], np.float32)
    hard = select_hard(x, student, teacher, audit_fraction=0.0)
    assert hard.reason.tolist() == ["disagreement", "low_confidence"]
    assert hard.label.tolist() == [1, 0]  # the teacher's labels


def test_hard_examples_roundtrip_and_bad_reason(tmp_path) -> None:
    hs = HardExampleSet(
        np.ones((2, 1, 8, 8), np.float32), np.array([3, 4]), np.array(["audit", "drift"])
    )
    hs.save(tmp_path / "h.npz")
    back = HardExampleSet.load(tmp_path / "h.npz")
    assert back.label.tolist() == [3, 4]
    with pytest.raises(ConfigError, match="unknown reason"):
        HardExampleSet(hs.x, hs.label, np.array(["audit", "bogus"]))


def test_edge_side_modules_do_not_import_torch() -> None:
    code = (
        "import sys; import edgeloop.artifacts, edgeloop.tasks.drift, edgeloop.tasks.digits, "
        "edgeloop.tasks.base, edgeloop.trainer.gate, edgeloop.cli.models_cmd, "
        "edgeloop.cli.keys_cmd, edgeloop.cli.train_cmd; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

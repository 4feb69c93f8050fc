"""The field-drift generator does what its docstring promises."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgeloop.tasks.digits import load_raw
from edgeloop.tasks.drift import DriftConfig, apply_drift


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_raw()[0][:200]


def test_severity_zero_is_identity(images: np.ndarray) -> None:
    out = apply_drift(images, DriftConfig(severity=0.0), seed=1)
    assert np.array_equal(out, images)
    assert out is not images


def test_same_seed_same_output_other_seed_differs(images: np.ndarray) -> None:
    cfg = DriftConfig(severity=0.5)
    a, b = apply_drift(images, cfg, seed=7), apply_drift(images, cfg, seed=7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, apply_drift(images, cfg, seed=8))


def test_input_is_not_modified(images: np.ndarray) -> None:
    before = images.copy()
    apply_drift(images, DriftConfig(severity=1.0), seed=3)
    assert np.array_equal(images, before)


def test_change_grows_with_severity(images: np.ndarray) -> None:
    changes = [
        float(np.abs(apply_drift(images, DriftConfig(severity=s), seed=5) - images).mean())
        for s in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]
    assert changes[0] == 0.0
    assert all(b > a for a, b in itertools.pairwise(changes)), changes


@pytest.mark.parametrize("kind", ["rotation", "blur", "noise", "brightness_contrast", "occlusion"])
def test_each_transformation_alone_changes_images(images: np.ndarray, kind: str) -> None:
    flags = {
        k: k == kind for k in ("rotation", "blur", "noise", "brightness_contrast", "occlusion")
    }
    out = apply_drift(images, DriftConfig(severity=0.8, **flags), seed=2)
    assert np.abs(out - images).mean() > 0.005
    assert out.min() >= 0.0
    assert out.max() <= 1.0


def test_brightness_shift_raises_the_mean(images: np.ndarray) -> None:
    only = {"rotation": False, "blur": False, "noise": False, "occlusion": False}
    out = apply_drift(images, DriftConfig(severity=1.0, **only), seed=2)
    assert out.mean() > images.mean() + 0.05


def test_occlusion_zeroes_a_block(images: np.ndarray) -> None:
    only = {"rotation": False, "blur": False, "noise": False, "brightness_contrast": False}
    out = apply_drift(images, DriftConfig(severity=1.0, **only), seed=2)
    # Occlusion only ever removes ink.
    assert (out <= images + 1e-6).all()
    assert (out == 0).sum() > (images == 0).sum()


@pytest.mark.parametrize("severity", [-0.1, 1.5])
def test_severity_out_of_range_is_refused(severity: float) -> None:
    with pytest.raises(ValueError, match="severity must be in"):
        DriftConfig(severity=severity)


def test_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        apply_drift(np.zeros((4, 64)), DriftConfig(severity=0.5), seed=0)

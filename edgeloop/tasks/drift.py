"""Field drift: what a camera in the field does to the images the model was trained on.

Numpy/scipy only, so the fleet simulator on a device-like host can use it. Every
transformation scales with one `severity` knob in [0, 1]; severity 0 returns the input
unchanged (bit for bit), and the expected size of the change grows with severity. Given
the same seed the output is identical.

Images are float arrays (N, H, W) in [0, 1]; the output stays in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Images = npt.NDArray[np.float32]

# Upper limits reached at severity 1. Chosen so that severity 1 hurts a clean-trained
# digits CNN badly but a human still reads most digits.
MAX_ROTATION_DEG = 30.0
MAX_BLUR_SIGMA = 0.8
MAX_NOISE_STD = 0.2
MAX_BRIGHTNESS_SHIFT = 0.3
MAX_CONTRAST_LOSS = 0.5
MAX_OCCLUSION_FRAC = 0.15


@dataclass(frozen=True)
class DriftConfig:
    severity: float
    rotation: bool = True
    blur: bool = True
    noise: bool = True
    brightness_contrast: bool = True
    occlusion: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.severity <= 1.0:
            raise ValueError(f"drift severity must be in [0, 1], got {self.severity}")


def apply_drift(images: npt.NDArray[np.floating], config: DriftConfig, seed: int) -> Images:
    """Return drifted copies of `images` (N, H, W); the input is never modified."""
    if images.ndim != 3:
        raise ValueError(f"apply_drift expects (N, H, W) images, got shape {images.shape}")
    out = np.asarray(images, dtype=np.float32).copy()
    s = config.severity
    if s == 0.0:
        return out
    # Lazy: scipy is only needed when something actually drifts.
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    n, h, w = out.shape
    for i in range(n):
        img = out[i]
        if config.rotation:
            # Random sign, magnitude between half and full of the severity's maximum, so
            # the mean change grows monotonically with severity.
            angle = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0) * s * MAX_ROTATION_DEG
            img = ndimage.rotate(img, angle, reshape=False, order=1, mode="constant", cval=0.0)
        if config.blur:
            img = ndimage.gaussian_filter(img, sigma=s * MAX_BLUR_SIGMA)
        if config.brightness_contrast:
            contrast = 1.0 - s * MAX_CONTRAST_LOSS * rng.uniform(0.5, 1.0)
            shift = s * MAX_BRIGHTNESS_SHIFT * rng.uniform(0.5, 1.0)
            img = (img - img.mean()) * contrast + img.mean() + shift
        if config.occlusion:
            side_h = max(1, round(h * np.sqrt(s * MAX_OCCLUSION_FRAC)))
            side_w = max(1, round(w * np.sqrt(s * MAX_OCCLUSION_FRAC)))
            top = int(rng.integers(0, h - side_h + 1))
            left = int(rng.integers(0, w - side_w + 1))
            img = img.copy()
            img[top : top + side_h, left : left + side_w] = 0.0
        if config.noise:
            img = img + rng.normal(0.0, s * MAX_NOISE_STD, size=img.shape)
        out[i] = np.clip(img, 0.0, 1.0)
    return out

"""Real photographs bundled with scikit-image, as model inputs (no download).

The benchmark times a model on them, and calibrated ranks
(:mod:`asymml_jax.calibration`) are measured on them: the rank an activation
needs depends on its content, and standard-normal noise has no low-rank
structure at all.
"""

from __future__ import annotations

import numpy as np

# Colour photographs in ``skimage.data`` that ship with the wheel.
PHOTOS: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def photo_batch(count: int, size: int, channels: int = 3) -> np.ndarray:
  """``count`` photographs, resized to ``size x size``, standardised, cycled.

  Args:
    count: images to return (the photos repeat, each flipped on its second use).
    size: output height and width.
    channels: 3 (RGB) or 1 (luminance).

  Returns:
    ``(count, size, size, channels)`` float32 with zero mean and unit variance.
  """
  if count < 1 or size < 1:
    raise ValueError(f"count and size must be >= 1, got {count} and {size}")
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  from skimage import color, transform  # pylint: disable=g-import-not-at-top
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top
  out = []
  for i in range(count):
    img = getattr(skdata, PHOTOS[i % len(PHOTOS)])()[..., :3]
    img = transform.resize(img, (size, size), anti_aliasing=True)
    if channels == 1:
      img = color.rgb2gray(img)[..., None]
    if (i // len(PHOTOS)) % 2:
      img = img[:, ::-1]
    out.append(img)
  x = np.stack(out).astype(np.float32)
  return (x - x.mean()) / max(float(x.std()), 1e-6)

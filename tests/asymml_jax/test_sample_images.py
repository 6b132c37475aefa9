"""Bundled photographs as model inputs."""

from __future__ import annotations

import numpy as np
import pytest

from asymml_jax import sample_images


def test_photo_batch_shape_standardised_and_cycled():
  n = len(sample_images.PHOTOS)
  x = sample_images.photo_batch(n + 1, 24)
  assert x.shape == (n + 1, 24, 24, 3) and x.dtype == np.float32
  assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-3
  np.testing.assert_allclose(x[n], x[0][:, ::-1], rtol=1e-5, atol=1e-5)  # reused, flipped
  assert not np.allclose(x[0], x[1])


def test_photo_batch_grey_and_bad_arguments():
  assert sample_images.photo_batch(2, 8, channels=1).shape == (2, 8, 8, 1)
  with pytest.raises(ValueError, match="channels"):
    sample_images.photo_batch(2, 8, channels=2)
  with pytest.raises(ValueError, match=">= 1"):
    sample_images.photo_batch(0, 8)

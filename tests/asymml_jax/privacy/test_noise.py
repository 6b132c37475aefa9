"""Tests of asymml_jax.privacy.noise (DESIGN section 7, "Mechanism")."""

from __future__ import annotations

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from asymml_jax.decomposition import clip_per_sample
from asymml_jax.privacy import noise

SHAPE = (4, 10, 10, 50)  # 20,000 elements: a KS test resolves a 1.5x scale error
SMALL = (4, 6, 6, 3)  # one shape for the small tests: fewer compilations


def _residual(seed: int, shape=SHAPE, norms=None) -> np.ndarray:
  """Random residuals, optionally rescaled to the given per-sample L2 norms."""
  r = np.random.default_rng(seed).standard_normal(shape)
  if norms is not None:
    flat = r.reshape(shape[0], -1)
    flat *= (np.asarray(norms) / np.linalg.norm(flat, axis=1))[:, None]
    r = flat.reshape(shape)
  return r.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("clip", "noise_multiplier"))
def _release(residual, key, sample_ids=None, *, clip, noise_multiplier):
  return noise.clip_and_noise(residual, key, clip=clip,
                              noise_multiplier=noise_multiplier,
                              sample_ids=sample_ids)


@functools.partial(jax.jit, static_argnames=("clip", "noise_multiplier"))
def _release_and_clipped(residual, key, sample_ids=None, *, clip,
                         noise_multiplier):
  return (_release(residual, key, sample_ids, clip=clip,
                   noise_multiplier=noise_multiplier),
          clip_per_sample(residual, clip))


def _noise_of(residual, key, *, clip, noise_multiplier, sample_ids=None):
  """Released minus clipped residual: the noise (jitted, one compile per shape)."""
  out, clipped = _release_and_clipped(residual, key, sample_ids, clip=clip,
                                      noise_multiplier=noise_multiplier)
  return np.asarray(out, np.float64) - np.asarray(clipped, np.float64)


def test_noise_std():
  assert noise.noise_std(0.5, 2.0) == 1.0
  assert noise.noise_std(3.0, 0.0) == 0.0
  with pytest.raises(ValueError, match="clip"):
    noise.noise_std(0.0, 1.0)
  with pytest.raises(ValueError, match="noise_multiplier"):
    noise.noise_std(1.0, -1.0)


@pytest.mark.parametrize("clip, sigma", [(1.0, 1.3), (0.25, 0.7)])
def test_noise_is_gaussian_at_the_configured_scale(clip, sigma):
  """KS: the noise is N(0, (sigma c)^2) and not at 2/3 or 3/2 of that scale."""
  x = _residual(0, norms=[0.1, 0.9, 5.0, 100.0])  # clipped and unclipped samples
  z = _noise_of(x, jax.random.key(7), clip=clip, noise_multiplier=sigma).ravel()
  assert z.size == 20_000
  std = sigma * clip
  assert stats.kstest(z, "norm", args=(0.0, std)).pvalue > 0.01
  for wrong in (2 / 3 * std, 3 / 2 * std):
    assert stats.kstest(z, "norm", args=(0.0, wrong)).pvalue < 1e-3
  # Each sample's noise alone is at the scale too (no sample-dependent scale).
  for row in z.reshape(SHAPE[0], -1):
    assert stats.kstest(row, "norm", args=(0.0, std)).pvalue > 1e-3


@pytest.mark.parametrize("clip", [0.1, 1.0])
def test_released_norms_before_noise_are_bounded(clip):
  norms = clip * np.array([1e-3, 0.5, 0.999, 1.0, 1.001, 2.0, 37.0, 1e4])
  x = _residual(1, shape=(8,) + SMALL[1:], norms=norms)
  released = np.asarray(noise.release_norms_before_noise(x, clip))
  assert released.shape == (8,)
  assert np.all(released <= clip + 1e-6)
  below = norms < clip
  np.testing.assert_allclose(released, np.minimum(norms, clip), rtol=1e-5)
  # Samples under the bound leave clipping unchanged, bit for bit.
  clipped = np.asarray(clip_per_sample(x, clip))
  np.testing.assert_array_equal(clipped[below], x[below])
  # With sigma = 0 the release is exactly the clipped residual.
  # (jit and eager may differ by an ulp in the scaling of clipped samples.)
  out = _release(x, jax.random.key(0), clip=clip, noise_multiplier=0.0)
  np.testing.assert_allclose(np.asarray(out), clipped, rtol=1e-6, atol=0)


def test_release_is_clipped_plus_per_sample_noise():
  x = _residual(2, shape=SMALL, norms=[0.5, 2.0, 9.0, 0.01])
  key = jax.random.key(3)
  out = noise.clip_and_noise(x, key, clip=1.0, noise_multiplier=0.8)
  expected = clip_per_sample(x, 1.0) + noise.per_sample_noise(
      key, x.shape, std=0.8, dtype=x.dtype)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6,
                             atol=1e-6)
  assert out.dtype == x.dtype and out.shape == x.shape
  # Jitted and eager agree.
  np.testing.assert_allclose(
      np.asarray(_release(x, key, clip=1.0, noise_multiplier=0.8)),
      np.asarray(out), rtol=1e-6, atol=1e-6)


def test_same_key_same_noise_different_key_different_noise():
  x = _residual(4, shape=(4, 32, 32, 4))  # 4096 per sample: corr s.d. ~0.016
  kw = dict(clip=1.0, noise_multiplier=1.0)
  k = jax.random.key(11)
  a = _noise_of(x, k, **kw)
  np.testing.assert_array_equal(a, _noise_of(x, k, **kw))
  for other in (jax.random.key(12), jax.random.fold_in(k, 1)):
    b = _noise_of(x, other, **kw)
    assert not np.allclose(a, b)
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.05
  # Samples of one batch get different noise streams.
  rows = a.reshape(4, -1)
  for i in range(4):
    for j in range(i):
      assert abs(np.corrcoef(rows[i], rows[j])[0, 1]) < 0.08


def test_raw_uint32_keys_work_too():
  x = _residual(5, shape=SMALL)
  z1 = _noise_of(x, jax.random.PRNGKey(0), clip=1.0, noise_multiplier=1.0)
  z2 = _noise_of(x, jax.random.PRNGKey(0), clip=1.0, noise_multiplier=1.0)
  np.testing.assert_array_equal(z1, z2)


def test_per_sample_noise_independent_of_batch_position_and_size():
  """Sample i's noise is fold_in(key, id_i)'s: the same in a batch of 4 and alone."""
  x = _residual(6, shape=SMALL, norms=[0.3, 3.0, 0.7, 30.0])
  key = jax.random.key(21)
  kw = dict(clip=1.0, noise_multiplier=1.5)
  batch = _noise_of(x, key, **kw)  # default ids: positions 0..3
  for i in range(4):
    alone = _noise_of(x[i:i + 1], key, sample_ids=jnp.array([i]), **kw)
    np.testing.assert_array_equal(alone[0], batch[i])
  # With explicit ids (e.g. data-set indices), order and batch size do not matter.
  ids = jnp.array([10, 11, 12, 13], jnp.int32)
  full = _noise_of(x, key, sample_ids=ids, **kw)
  sub = _noise_of(x[[2, 0]], key, sample_ids=ids[jnp.array([2, 0])], **kw)
  np.testing.assert_array_equal(sub[0], full[2])
  np.testing.assert_array_equal(sub[1], full[0])
  # Nor do the other samples' values.
  y = x.copy()
  y[[0, 1, 3]] *= 5.0
  np.testing.assert_array_equal(_noise_of(y, key, sample_ids=ids, **kw)[2],
                                full[2])


def test_none_key_raises():
  x = _residual(7, shape=(2, 3, 3, 2))
  with pytest.raises(ValueError, match="key is required"):
    noise.clip_and_noise(x, None, clip=1.0, noise_multiplier=1.0)
  with pytest.raises(ValueError, match="key is required"):
    noise.clip_and_noise(x, None, clip=1.0, noise_multiplier=0.0)
  with pytest.raises(ValueError, match="key is required"):
    noise.per_sample_noise(None, (2, 3))


def test_key_is_required_argument():
  x = _residual(8, shape=(2, 3, 3, 2))
  with pytest.raises(TypeError):
    noise.clip_and_noise(x, clip=1.0, noise_multiplier=1.0)  # type: ignore[call-arg]


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(clip=0.0, noise_multiplier=1.0), "clip"),
    (dict(clip=1.0, noise_multiplier=-0.5), "noise_multiplier"),
    (dict(clip=1.0, noise_multiplier=1.0, sample_ids=jnp.arange(3)), "shape"),
    (dict(clip=1.0, noise_multiplier=0.0, sample_ids=jnp.arange(3)), "shape"),
    (dict(clip=1.0, noise_multiplier=1.0, sample_ids=jnp.zeros(2)), "integers"),
])
def test_bad_arguments_raise(kwargs, pattern):
  x = _residual(9, shape=(2, 3, 3, 2))
  with pytest.raises(ValueError, match=pattern):
    noise.clip_and_noise(x, jax.random.key(0), **kwargs)


def test_doctests():
  result = doctest.testmod(noise)
  assert result.attempted > 0 and result.failed == 0

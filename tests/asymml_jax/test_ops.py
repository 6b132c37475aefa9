"""Tests of asymml_jax.ops (DESIGN sections 1 and 3, steps 2-4)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asymml_jax import decomposition as dec
from asymml_jax import ops


def _normal(seed: int, shape) -> np.ndarray:
  """Test data from NumPy (eager jax.random would compile per shape)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _spec(kernel_size=(3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
          in_features=4, features=5, use_bias=True) -> ops.ConvSpec:
  return ops.ConvSpec(name="c", site="s", in_features=in_features,
                      features=features, kernel_size=kernel_size,
                      strides=strides, padding=padding, use_bias=use_bias)


# (spec, input h, input w)
GEOMETRIES = [
    (_spec(), 8, 8),
    (_spec(kernel_size=(7, 7), strides=(2, 2), padding=((3, 3), (3, 3))), 32, 32),
    (_spec(kernel_size=(7, 7), strides=(2, 2), padding=((3, 3), (3, 3))), 15, 22),
    (_spec(kernel_size=(1, 1), strides=(2, 2), padding=((0, 0), (0, 0))), 9, 6),
    (_spec(kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1))), 7, 10),
    (_spec(kernel_size=(3, 3), strides=(1, 1), padding=((0, 0), (0, 0))), 5, 9),
    (_spec(kernel_size=(5, 3), strides=(2, 1), padding=((2, 1), (0, 1))), 11, 6),
    (_spec(kernel_size=(3, 3), strides=(3, 2), padding=((0, 2), (1, 0))), 10, 13),
]
IDS = [f"k{s.kernel_size}-s{s.strides}-p{s.padding}-{h}x{w}" for s, h, w in GEOMETRIES]


@pytest.mark.parametrize("spec, h, w", GEOMETRIES, ids=IDS)
def test_output_hw_and_macs_match_lax(spec, h, w):
  x = jax.ShapeDtypeStruct((2, h, w, spec.in_features), jnp.float32)
  k = jax.ShapeDtypeStruct(spec.kernel_size + (spec.in_features, spec.features),
                           jnp.float32)
  out = jax.eval_shape(functools.partial(ops.conv, strides=spec.strides,
                                         padding=spec.padding), x, k)
  assert out.shape == (2, *spec.output_hw(h, w), spec.features)
  ho, wo = out.shape[1:3]
  kh, kw = spec.kernel_size
  assert spec.macs(h, w) == ho * wo * kh * kw * spec.in_features * spec.features
  assert spec.macs(h, w, in_channels=2) == ho * wo * kh * kw * 2 * spec.features


def test_macs_golden_numbers():
  # ResNet-18's first conv on a 224x224 RGB image: 112 * 112 * 7 * 7 * 3 * 64.
  conv1 = _spec(kernel_size=(7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                in_features=3, features=64)
  assert conv1.output_hw(224, 224) == (112, 112)
  assert conv1.macs(224, 224) == 118_013_952
  # A 3x3 conv, 64 -> 64 on 32x32 (CIFAR): 32 * 32 * 9 * 64 * 64.
  assert _spec(in_features=64, features=64).macs(32, 32) == 37_748_736
  # The folded trusted conv at r = 4 costs r / C of the dense one.
  assert _spec(in_features=64, features=64).macs(32, 32, in_channels=4) * 16 == 37_748_736


# ----------------------------------------------------------------------------
# conv(P, W x_C U) + conv(R, W) == conv(X, W)
# ----------------------------------------------------------------------------


SPLIT_HW = (11, 14)  # one (non-square) input shape: one decomposition compile
SPLIT_SPECS = [GEOMETRIES[i][0] for i in (0, 2, 3, 6)]


@functools.partial(jax.jit, static_argnames="scope")
def _decompose(x, key, *, scope):
  return dec.decompose(x, key, 2, tau=0.0, scope=scope)


@functools.partial(jax.jit, static_argnames="spec")
def _halves_and_dense(d, x, kernel, *, spec):
  y_l = ops.lowrank_conv(d.p, d.u, kernel, spec)
  y_r = ops.untrusted_conv(d.residual, kernel, spec)
  dense = ops.conv(x, kernel, spec.strides, spec.padding)
  via_xl = ops.conv(dec.reconstruct(d.p, d.u), kernel, spec.strides, spec.padding)
  return y_l, y_r, dense, via_xl


@pytest.mark.parametrize("scope", dec.SCOPES)
@pytest.mark.parametrize("spec", SPLIT_SPECS,
                         ids=[f"k{s.kernel_size}-s{s.strides}-p{s.padding}"
                              for s in SPLIT_SPECS])
def test_lowrank_plus_untrusted_is_the_dense_conv(spec, scope):
  x = jnp.asarray(_normal(0, (3, *SPLIT_HW, spec.in_features)) + 0.3)
  kernel = _normal(spec.kernel_size[0],
                   spec.kernel_size + (spec.in_features, spec.features))
  d = _decompose(x, jax.random.key(0), scope=scope)
  chex.assert_shape(d.u, (3, 4, 2) if scope == "per_sample" else (4, 2))
  y_l, y_r, dense, via_xl = _halves_and_dense(d, x, kernel, spec=spec)
  chex.assert_shape(dense, (3, *spec.output_hw(*SPLIT_HW), spec.features))
  chex.assert_shape([y_l, y_r], dense.shape)
  scale = float(jnp.abs(dense).max())
  np.testing.assert_allclose(y_l + y_r, dense, rtol=1e-5, atol=1e-5 * scale)
  # The trusted half is the conv of the low-rank part X_L = U P ...
  np.testing.assert_allclose(y_l, via_xl, rtol=1e-5, atol=1e-5 * scale)
  # ... and both halves carry signal (the split is not trivial).
  assert float(jnp.abs(y_l).max()) > 0.1 * scale
  assert float(jnp.abs(y_r).max()) > 0.1 * scale


def test_per_sample_lowrank_conv_uses_each_samples_basis():
  spec = _spec()
  x = _normal(0, (2, 6, 5, 4))
  kernel = _normal(1, (3, 3, 4, 5))
  u = jnp.asarray(np.linalg.qr(np.random.default_rng(0).standard_normal((2, 4, 2)))[0],
                  jnp.float32)
  p = dec.project(x, u)
  y = ops.lowrank_conv(p, u, kernel, spec)
  for i in range(2):
    one = ops.lowrank_conv(p[i:i + 1], u[i], kernel, spec)  # shared-U path
    np.testing.assert_allclose(y[i:i + 1], one, rtol=1e-5, atol=1e-5)
  swapped = ops.lowrank_conv(p, u[::-1], kernel, spec)
  assert float(jnp.abs(swapped - y).max()) > 1e-2


# ----------------------------------------------------------------------------
# fold_kernel, untrusted_conv, combine
# ----------------------------------------------------------------------------


def test_fold_kernel_equals_explicit_sum():
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((3, 2, 5, 4)).astype(np.float32)
  u = rng.standard_normal((5, 3)).astype(np.float32)
  ub = rng.standard_normal((2, 5, 3)).astype(np.float32)
  expected = np.zeros((3, 2, 3, 4))
  for c in range(5):  # W'[h, w, r, o] = sum_c W[h, w, c, o] U[c, r]
    expected += kernel[:, :, c, None, :] * u[c][None, None, :, None]
  folded = ops.fold_kernel(jnp.asarray(kernel), jnp.asarray(u))
  chex.assert_shape(folded, (3, 2, 3, 4))
  np.testing.assert_allclose(folded, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(folded, np.einsum("hwco,cr->hwro", kernel, u),
                             rtol=1e-5, atol=1e-5)
  folded_b = ops.fold_kernel(jnp.asarray(kernel), jnp.asarray(ub))
  chex.assert_shape(folded_b, (2, 3, 2, 3, 4))
  for b in range(2):
    np.testing.assert_allclose(folded_b[b], np.einsum("hwco,cr->hwro", kernel, ub[b]),
                               rtol=1e-5, atol=1e-5)


def test_untrusted_conv_runs_in_the_residuals_dtype():
  spec = _spec()
  r = jnp.asarray(_normal(0, (1, 6, 6, 4)), jnp.bfloat16)
  kernel = jnp.asarray(_normal(1, (3, 3, 4, 5)))
  y = ops.untrusted_conv(r, kernel, spec)
  assert y.dtype == jnp.bfloat16
  ref = ops.conv(r.astype(jnp.float32), kernel, spec.strides, spec.padding)
  np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=0.05, atol=0.1)


def test_combine_adds_both_halves_and_the_bias():
  y_l = jnp.arange(24.0).reshape(1, 2, 3, 4)
  y_r = jnp.full((1, 2, 3, 4), 0.5)
  bias = jnp.array([1.0, -2.0, 3.0, 10.0])
  np.testing.assert_allclose(ops.combine(y_l, y_r, bias), y_l + y_r + bias)
  np.testing.assert_allclose(ops.combine(y_l, y_r, None), y_l + y_r)
  np.testing.assert_allclose(ops.combine(None, y_r, bias), y_r + bias)
  np.testing.assert_allclose(ops.combine(None, y_r, None), y_r)
  # The bias is per output channel (last axis).
  np.testing.assert_allclose(ops.combine(None, jnp.zeros((1, 2, 3, 4)), bias)[0, 1, 2],
                             bias)


@pytest.mark.parametrize("spec, h, w", GEOMETRIES + [
    (_spec(), 2, 2), (_spec(), 1, 1), (_spec(kernel_size=(3, 3), strides=(2, 2)), 2, 3)],
    ids=IDS + ["3x3-on-2x2", "3x3-on-1x1", "3x3-s2-on-2x3"])
def test_im2col_conv_is_lax_conv_and_conv_uses_it_for_small_inputs(spec, h, w):
  x = _normal(0, (2, h, w, spec.in_features))
  kernel = _normal(1, spec.kernel_size + (spec.in_features, spec.features))
  ref = jax.lax.conv_general_dilated(x, kernel, spec.strides, spec.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(ops.im2col_conv(x, kernel, spec.strides, spec.padding), ref,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ops.conv(x, kernel, spec.strides, spec.padding), ref,
                             rtol=1e-5, atol=1e-5)
  small = h < spec.kernel_size[0] or w < spec.kernel_size[1]
  text = jax.jit(ops.conv, static_argnums=(2, 3)).lower(
      x, kernel, spec.strides, spec.padding).as_text()
  assert ("dot_general" in text) == small  # im2col only where the kernel exceeds the input


# ----------------------------------------------------------------------------
# Per-sample convolutions without conv_general_dilated_patches
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("strides,padding", [((1, 1), ((1, 1), (1, 1))),
                                             ((2, 2), ((0, 1), (1, 0)))])
def test_shifted_patches_are_lax_patches_in_tap_major_order(strides, padding):
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
  ours = ops.shifted_patches(x, (3, 3), strides, padding)
  lax = ops._patches(x, (3, 3), strides, padding)  # channel-major: (c, i, j)
  assert ours.shape == lax.shape
  b, h, w, _ = lax.shape
  reordered = lax.reshape(b, h, w, 3, 9).swapaxes(-1, -2).reshape(b, h, w, 27)
  np.testing.assert_allclose(ours, reordered, rtol=1e-6)


@pytest.mark.parametrize("batch,rank,loop", [(3, 2, True), (3, 2, False), (10, 2, False),
                                             (3, 9, False)])
@pytest.mark.parametrize("strides,padding", [((1, 1), ((1, 1), (1, 1))),
                                             ((2, 2), ((0, 1), (1, 0)))])
def test_per_sample_conv_is_each_samples_conv(batch, rank, loop, strides, padding, monkeypatch):
  monkeypatch.setattr(ops, "LOOP_MIN_PIXELS", 1 if loop else 10**9)
  k = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(k[0], (batch, 7, 6, rank))
  kernels = jax.random.normal(k[1], (batch, 3, 3, rank, 5))
  got = ops.per_sample_conv(x, kernels, strides, padding)
  want = jnp.concatenate([ops.conv(x[i:i + 1], kernels[i], strides, padding)
                          for i in range(batch)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), ((0, 2), (2, 0)), ((0, 0), (0, 0))])
def test_fused_multiply_add_conv_and_its_gradient_are_each_samples_conv(rank, padding):
  k = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(k[0], (3, 7, 6, rank))
  kernels = jax.random.normal(k[1], (3, 3, 3, rank, 5))
  assert rank <= ops.FMA_MAX_RANK  # the fused path
  ours = lambda x, kern: ops.per_sample_conv(x, kern, (1, 1), padding)
  ref = lambda x, kern: jnp.concatenate([ops.conv(x[i:i + 1], kern[i], (1, 1), padding)
                                         for i in range(3)])
  y, vjp = jax.vjp(ours, x, kernels)
  y_ref, vjp_ref = jax.vjp(ref, x, kernels)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  dy = jax.random.normal(k[2], y.shape)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

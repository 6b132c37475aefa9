"""Tests of asymml_jax.privacy.gradients (DESIGN section 3, "Backward")."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from asymml_jax import decomposition as dec
from asymml_jax import ops
from asymml_jax.privacy import gradients as g

# A strided, asymmetrically padded, non-square convolution.
SPEC = ops.ConvSpec(name="c", site="s", in_features=6, features=12, kernel_size=(3, 3),
                    strides=(2, 1), padding=((1, 0), (2, 1)))
X_SHAPE = (3, 9, 7, 6)
CFG = g.GradientRelease(spec=SPEC, r_max=3)


def _inputs(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], X_SHAPE)
  w = 0.3 * jax.random.normal(k[1], (3, 3, 6, 12))
  target = jax.random.normal(k[2], (X_SHAPE[0], *SPEC.output_hw(9, 7), 12))
  return x, w, target


def _head(y, target):
  # Non-linear, so dY depends on the activations (ReLU-like masks included).
  return jnp.sum(jax.nn.relu(y) * target) + 0.5 * jnp.sum(jnp.tanh(y) ** 2)


@functools.partial(jax.jit, static_argnames="cfg")
def _split_grads(x, w, target, cfg=CFG):
  def loss(x, w):
    d = dec.decompose(x, jax.random.key(1), 2)
    y_l = ops.lowrank_conv(d.p, d.u, w, SPEC)
    y_r = g.protect_output(ops.untrusted_conv(d.residual, w, SPEC), d.residual, w,
                           jax.random.key(2), cfg)
    return _head(y_l + y_r, target)
  return jax.grad(loss, (0, 1))(x, w)


@jax.jit
def _dense_grads(x, w, target):
  return jax.grad(lambda x, w: _head(ops.conv(x, w, SPEC.strides, SPEC.padding), target),
                  (0, 1))(x, w)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("seed", [0, 1])
def test_protected_split_gives_the_dense_gradients(seed):
  x, w, target = _inputs(seed)
  (gx, gw), (dx, dw) = _split_grads(x, w, target), _dense_grads(x, w, target)
  assert _rel(gx, dx) < 1e-5 and _rel(gw, dw) < 1e-5


def test_without_the_trusted_shares_the_gradient_would_be_wrong():
  """The TEE's shares carry real gradient mass: dropping them is detectable."""
  x, w, target = _inputs(0)
  _, dw = _dense_grads(x, w, target)
  dy = jax.grad(lambda y: _head(y, target))(ops.conv(x, w, SPEC.strides, SPEC.padding))
  d, released = g.split_output_gradient(dy, jax.random.key(2), CFG)
  r = dec.decompose(x, jax.random.key(1), 2).residual
  dr, dw_share = g.trusted_gradient_shares(r, w, d.p, d.u, SPEC)
  assert float(jnp.linalg.norm(dw_share)) > 1e-3 * float(jnp.linalg.norm(dw))
  assert float(jnp.linalg.norm(dr)) > 0


def test_trusted_shares_equal_the_unfolded_computation():
  x, w, _ = _inputs(3)
  dy = jax.random.normal(jax.random.key(5), (X_SHAPE[0], *SPEC.output_hw(9, 7), 12))
  d, _ = g.split_output_gradient(dy, jax.random.key(6), CFG)
  dy_l = dec.reconstruct(d.p, d.u)
  _, vjp = jax.vjp(lambda r, k: ops.conv(r, k, SPEC.strides, SPEC.padding), x, w)
  want_dr, want_dw = vjp(dy_l)
  dr, dw = g.trusted_gradient_shares(x, w, d.p, d.u, SPEC)
  assert _rel(dr, want_dr) < 1e-5 and _rel(dw, want_dw) < 1e-5


def test_released_gradient_has_no_principal_component():
  dy = jax.random.normal(jax.random.key(4), (4, 5, 5, 12))
  dy = dy + 10.0 * dy[..., :1]  # one dominant output channel direction
  d, released = g.split_output_gradient(dy, jax.random.key(0), CFG)
  proj = dec.project(released, d.u)
  assert float(jnp.max(jnp.abs(proj))) < 1e-4 * float(jnp.max(jnp.abs(dy)))
  e = lambda a: float(jnp.sum(a * a))  # noqa: E731
  assert e(released) < 0.2 * e(dy)  # the dominant direction stayed inside
  np.testing.assert_allclose(np.asarray(released + dec.reconstruct(d.p, d.u)),
                             np.asarray(dy), atol=1e-5)


def test_zero_gradients_of_padding_rows_stay_finite():
  dy = jnp.zeros((3, 4, 4, 12)).at[0].set(1.0)
  cfg = g.GradientRelease(spec=SPEC, r_max=3, clip=0.5, noise_multiplier=1.0)
  d, released = g.split_output_gradient(dy, jax.random.key(0), cfg)
  assert bool(jnp.all(jnp.isfinite(released))) and bool(jnp.all(jnp.isfinite(d.p)))


def test_dp_release_is_clipped_residual_plus_noise_at_the_configured_scale():
  clip, sigma = 0.05, 1.2
  dy = 3.0 * jax.random.normal(jax.random.key(8), (8, 10, 10, 12))
  cfg = g.GradientRelease(spec=SPEC, r_max=3, clip=clip, noise_multiplier=sigma)
  plain = g.GradientRelease(spec=SPEC, r_max=3)
  _, released = g.split_output_gradient(dy, jax.random.key(9), cfg)
  _, residual = g.split_output_gradient(dy, jax.random.key(9), plain)
  clipped = dec.clip_per_sample(residual, clip)
  norms = jnp.linalg.norm(clipped.reshape(8, -1), axis=1)
  assert bool(jnp.all(norms <= clip * (1 + 1e-5)))
  z = np.asarray(released - clipped, np.float64).ravel()
  std = sigma * clip
  assert stats.kstest(z, "norm", args=(0.0, std)).pvalue > 0.01
  for wrong in (2 / 3 * std, 3 / 2 * std):
    assert stats.kstest(z, "norm", args=(0.0, wrong)).pvalue < 1e-3


def test_fresh_keys_give_fresh_noise():
  dy = jax.random.normal(jax.random.key(8), (2, 4, 4, 12))
  cfg = g.GradientRelease(spec=SPEC, r_max=3, clip=1.0, noise_multiplier=1.0)
  a = g.split_output_gradient(dy, jax.random.key(1), cfg)[1]
  b = g.split_output_gradient(dy, jax.random.key(2), cfg)[1]
  c = g.split_output_gradient(dy, jax.random.key(1), cfg)[1]
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(r_max=0), "r_max must be in"),
    (dict(r_max=13), "r_max must be in"),
    (dict(r_max=2, clip=0.0), "clip must be > 0"),
    (dict(r_max=2, noise_multiplier=1.0), "noise needs a clip"),
])
def test_bad_settings_raise(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    g.GradientRelease(spec=SPEC, **kwargs)


@pytest.mark.parametrize("kernel_size,padding,strides", [
    ((3, 3), ((1, 1), (1, 1)), (1, 1)),   # batched products
    ((3, 3), ((0, 1), (1, 0)), (1, 1)),   # batched products, asymmetric padding
    ((1, 1), ((0, 0), (0, 0)), (1, 1)),   # 1x1 shortcut
    ((3, 3), ((1, 1), (1, 1)), (2, 2)),   # strided: the vmapped VJP
])
def test_trusted_gradient_shares_are_the_per_sample_vjp(kernel_size, padding, strides):
  spec = ops.ConvSpec(name="c", site="s", in_features=4, features=6, kernel_size=kernel_size,
                      strides=strides, padding=padding)
  ho, wo = spec.output_hw(9, 8)
  k = jax.random.split(jax.random.key(7), 4)
  r = jax.random.normal(k[0], (10, 9, 8, 4))
  kernel = jax.random.normal(k[1], (*kernel_size, 4, 6))
  p = jax.random.normal(k[2], (10, ho, wo, 2))
  q = jax.random.normal(k[3], (10, 6, 2))
  dr, dw = g.trusted_gradient_shares(r, kernel, p, q, spec)
  dy_l = jnp.einsum("bhwr,bor->bhwo", p, q)
  _, vjp = jax.vjp(lambda x, w: ops.conv(x, w, spec.strides, spec.padding), r, kernel)
  want_dr, want_dw = vjp(dy_l)
  np.testing.assert_allclose(dr, want_dr, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-3)

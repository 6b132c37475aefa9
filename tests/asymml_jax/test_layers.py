"""Tests of asymml_jax.layers (DESIGN sections 1 and 3)."""

from __future__ import annotations

import functools

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asymml_jax import decomposition as dec
from asymml_jax import layers


def _normal(seed: int, shape) -> np.ndarray:
  """Test data from NumPy (eager jax.random would compile per shape)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


X_SHAPE = (2, 8, 7, 6)  # non-square, C = 6
CFG = {
    scope: dec.DecompositionConfig(rank_fraction=0.25, tau=0.1, scope=scope)
    for scope in dec.SCOPES
}  # r_max = ceil(6 / 4) = 2


def _x(seed: int = 0) -> jax.Array:
  return jnp.asarray(_normal(seed, X_SHAPE) + 0.2)


# ----------------------------------------------------------------------------
# AsymConv == nn.Conv
# ----------------------------------------------------------------------------

# (kernel_size, strides, padding)
CONVS = [
    ((3, 3), (1, 1), "SAME"),
    ((3, 3), (2, 2), "SAME"),  # even input: lax pads (0, 1), not (1, 1)
    ((4, 4), (1, 1), "SAME"),  # even kernel: asymmetric pads
    ((3, 3), (1, 1), "VALID"),
    ((3, 2), (2, 1), "VALID"),
    ((3, 3), (2, 2), ((1, 2), (0, 1))),
    ((1, 1), (2, 2), ((0, 0), (0, 0))),
    ((7, 7), (2, 2), ((3, 3), (3, 3))),
]
CONV_CASES = [(*conv, "per_sample") for conv in CONVS] + [
    (*CONVS[i], "per_batch") for i in (1, 5, 7)]
CONV_IDS = [f"k{k}-s{s}-{p}-{scope}".replace(" ", "")
            for k, s, p, scope in CONV_CASES]


def _modules(kernel_size, strides, padding, scope):
  dense = nn.Conv(4, kernel_size, strides=strides, padding=padding)
  asym = layers.AsymConv(4, kernel_size, strides=strides, padding=padding,
                         decomposition=CFG[scope])
  return dense, asym


@functools.partial(jax.jit, static_argnames=("kernel_size", "strides", "padding",
                                             "scope"))
def _both(params, x, key, *, kernel_size, strides, padding, scope):
  """Outputs, intermediates and (param, input) gradients of nn.Conv and AsymConv."""

  def loss(module, params, x):
    y, state = module.apply({"params": params}, x, rngs={"decompose": key},
                            mutable=["intermediates"])
    return jnp.sum(jnp.sin(y) * jnp.arange(1.0, 5.0)), (y, state)

  out = {}
  for name, module in zip(("dense", "asym"),
                          _modules(kernel_size, strides, padding, scope)):
    (_, (y, state)), grads = jax.value_and_grad(
        functools.partial(loss, module), argnums=(0, 1), has_aux=True)(params, x)
    out[name] = (y, state, grads)
  return out


def _padding_key(padding):
  if isinstance(padding, str):
    return padding
  return tuple(tuple(p) for p in padding)


@pytest.mark.parametrize("kernel_size, strides, padding, scope", CONV_CASES,
                         ids=CONV_IDS)
def test_asym_conv_equals_nn_conv(kernel_size, strides, padding, scope):
  x = _x(1)
  dense, asym = _modules(kernel_size, strides, padding, scope)
  # Same parameter names and shapes: weights are interchangeable.
  shapes = jax.eval_shape(dense.init, jax.random.key(0), x)
  asym_shapes = jax.eval_shape(
      asym.init, {"params": jax.random.key(0), "decompose": jax.random.key(1)}, x)
  chex.assert_trees_all_equal_shapes(asym_shapes, shapes)
  seed = kernel_size[0] * 10 + strides[0]
  params = {"kernel": _normal(seed, shapes["params"]["kernel"].shape) * 0.3,
            "bias": _normal(seed + 1, (4,))}  # non-zero bias

  out = _both(params, x, jax.random.key(2), kernel_size=kernel_size,
              strides=strides, padding=_padding_key(padding), scope=scope)
  y_dense, _, (gp_dense, gx_dense) = out["dense"]
  y_asym, state, (gp_asym, gx_asym) = out["asym"]
  assert y_asym.shape == y_dense.shape
  scale = float(jnp.abs(y_dense).max())
  np.testing.assert_allclose(y_asym, y_dense, rtol=1e-5, atol=1e-5 * scale)
  chex.assert_trees_all_close(gp_asym, gp_dense, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gx_asym, gx_dense, rtol=1e-4,
                             atol=1e-5 * float(jnp.abs(gx_dense).max()))
  # The residual that would leave the enclave is recorded, input-shaped, and
  # smaller than the input (it is not the input itself).
  (residual,) = state["intermediates"]["residual"]
  assert residual.shape == x.shape
  assert 0.0 < float(jnp.sum(residual ** 2)) < 0.9 * float(jnp.sum(x ** 2))


def _conv_vars(c_in: int = 6, c_out: int = 3):
  return {"params": {"kernel": _normal(7, (3, 3, c_in, c_out)),
                     "bias": _normal(8, (c_out,))}}


def test_asym_conv_split_false_is_dense_and_sows_nothing():
  x = _x()
  v = _conv_vars()
  m = layers.AsymConv(3, (3, 3), split=False)
  y, state = jax.jit(functools.partial(m.apply, mutable=["intermediates"]))(v, x)
  ref = jax.jit(nn.Conv(3, (3, 3)).apply)(v, x)  # no 'decompose' rng needed
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  assert not state.get("intermediates")


def test_asym_conv_needs_the_decompose_rng():
  x = _x()
  m = layers.AsymConv(3, (3, 3), decomposition=CFG["per_sample"])
  v = _conv_vars()
  with pytest.raises(flax.errors.InvalidRngError, match="decompose"):
    m.apply(v, x)
  with pytest.raises(flax.errors.InvalidRngError, match="decompose"):
    m.apply(v, x, rngs={"dropout": jax.random.key(0)})


def test_asym_conv_rejects_bad_input_and_padding():
  m = layers.AsymConv(3, (3, 3))
  rngs = {"params": jax.random.key(0), "decompose": jax.random.key(1)}
  with pytest.raises(ValueError, match="NHWC"):
    m.init(rngs, jnp.ones((8, 8, 3)))
  with pytest.raises(ValueError, match="padding"):
    layers.AsymConv(3, (3, 3), padding="CIRCULAR").init(rngs, jnp.ones((1, 4, 4, 3)))


# ----------------------------------------------------------------------------
# Norm
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("channels, groups", [
    (64, 32), (16, 8), (3, 1), (2, 1), (1, 1), (48, 24), (96, 32), (6, 3), (10, 5),
    (128, 32)])
def test_group_count(channels, groups):
  g = layers.group_count(channels)
  assert g == groups
  assert channels % g == 0 and g <= 32
  assert g == 1 or channels // g >= 2


def test_norm_none_is_identity():
  x = _x()
  m = layers.Norm("none")
  v = m.init(jax.random.key(0), x, train=True)
  assert not v
  np.testing.assert_array_equal(m.apply(v, x, train=True), x)


def test_norm_batch_normalises_over_the_batch_and_tracks_statistics():
  x = _x() * 3.0 + jnp.arange(6.0)
  m = layers.Norm("batch")
  v = jax.jit(functools.partial(m.init, train=True))(jax.random.key(0), x)
  apply_train = jax.jit(functools.partial(m.apply, train=True,
                                          mutable=["batch_stats"]))
  y, state = apply_train(v, x)
  np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.var(y, axis=(0, 1, 2)), 1.0, rtol=1e-3)
  mean = state["batch_stats"]["BatchNorm_0"]["mean"]
  np.testing.assert_allclose(mean, 0.1 * jnp.mean(x, axis=(0, 1, 2)), rtol=1e-5,
                             atol=1e-6)  # momentum 0.9 from zero
  # Eval mode uses the running statistics (initially mean 0, var 1).
  y_eval = jax.jit(functools.partial(m.apply, train=False))(v, x)
  np.testing.assert_allclose(y_eval, x / jnp.sqrt(1.0 + 1e-5), rtol=1e-5, atol=1e-6)
  # BatchNorm mixes samples: changing sample 1 changes sample 0's output.
  y2, _ = apply_train(v, x.at[1].multiply(5.0))
  assert float(jnp.abs(y2[0] - y[0]).max()) > 1e-2


def test_norm_group_normalises_each_sample_by_groups():
  x = jnp.asarray(_normal(0, (2, 4, 5, 16)) * 2.0 + np.arange(16.0, dtype=np.float32))
  m = layers.Norm("group")
  v = jax.jit(functools.partial(m.init, train=True))(jax.random.key(0), x)
  apply = jax.jit(functools.partial(m.apply, train=True))
  y = apply(v, x)
  g = layers.group_count(16)
  xs = np.asarray(x, np.float64).reshape(2, 4, 5, g, 16 // g)
  mu = xs.mean(axis=(1, 2, 4), keepdims=True)
  var = xs.var(axis=(1, 2, 4), keepdims=True)
  expected = ((xs - mu) / np.sqrt(var + 1e-5)).reshape(x.shape)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
  # Per sample: changing sample 1 leaves sample 0 alone.
  y2 = apply(v, x.at[1].multiply(5.0))
  np.testing.assert_allclose(y2[0], y[0], rtol=1e-6, atol=1e-6)


def test_norm_rejects_unknown_kind():
  with pytest.raises(ValueError, match="norm"):
    layers.Norm("layer").init(jax.random.key(0), _x(), train=True)


# ----------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------


def _pool_by_hand(x: np.ndarray, kind: str, window: int, stride: int,
                  padding: int) -> np.ndarray:
  fill = -np.inf if kind == "max" else 0.0
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
              constant_values=fill)
  b, h, w, c = xp.shape
  ho, wo = (h - window) // stride + 1, (w - window) // stride + 1
  out = np.zeros((b, ho, wo, c))
  for i in range(ho):
    for j in range(wo):
      win = xp[:, i * stride:i * stride + window, j * stride:j * stride + window]
      out[:, i, j] = win.max(axis=(1, 2)) if kind == "max" else win.sum(axis=(1, 2)) / window ** 2
  return out


@pytest.mark.parametrize("window, stride, padding", [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_max_and_avg_pool_match_hand_computation(window, stride, padding):
  # All negative: zero padding would show up in the max at the border.
  x = -1.0 - np.random.default_rng(0).uniform(size=(2, 7, 6, 3)).astype(np.float32) * 4.0
  y_max = np.asarray(layers.pool(jnp.asarray(x), "max", window, stride, padding))
  y_avg = np.asarray(layers.pool(jnp.asarray(x), "avg", window, stride, padding))
  np.testing.assert_allclose(y_max, _pool_by_hand(x, "max", window, stride, padding),
                             rtol=1e-6)
  np.testing.assert_allclose(y_avg, _pool_by_hand(x, "avg", window, stride, padding),
                             rtol=1e-5)
  assert np.all(y_max < 0)  # -inf padding: never the padded zero
  assert np.abs(y_max - y_avg).max() > 0.5


def test_max_pool_3x3_stride_2_pad_1_golden():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1) - 20.0  # -20 .. -5, row-major
  y = layers.pool(x, "max", 3, 2, padding=1)
  # windows over rows/cols {0,1}, {1,2,3}: maxima of the lower-right corners.
  np.testing.assert_array_equal(y[0, :, :, 0], [[-15.0, -13.0], [-7.0, -5.0]])
  y = layers.pool(x, "avg", 3, 2, padding=1)
  # top-left window: (-20 - 19 - 16 - 15) / 9 with five zeros of padding.
  np.testing.assert_allclose(y[0, 0, 0, 0], -70.0 / 9.0, rtol=1e-6)


@pytest.mark.parametrize("k", [2, 3])
def test_tile_max_pool_is_flax_max_pool_with_its_gradient(k):
  rng = np.random.default_rng(k)
  x = rng.standard_normal((2, 6 * k, 4 * k, 5)).astype(np.float32)
  x[0, :k, :k, :] = 0.0                   # a window of exact ties: first position wins
  x[1, k:2 * k, :k, 0] = x[1, k, 0, 0]
  x = jnp.asarray(np.maximum(x, 0.0) if k == 2 else x)  # ReLU'd maps tie at zero
  dy = jnp.asarray(rng.standard_normal((2, 6, 4, 5)).astype(np.float32))
  ref = lambda v: nn.max_pool(v, (k, k), (k, k))
  got = lambda v: layers.pool(v, "max", k, k)
  y_ref, vjp_ref = jax.vjp(ref, x)
  y, vjp = jax.vjp(got, x)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(vjp(dy)[0], vjp_ref(dy)[0])
  assert np.count_nonzero(np.asarray(vjp(dy)[0])) == dy.size  # one position per window


def test_pool_falls_back_when_tiles_do_not_fit():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 4, 2)).astype(np.float32))
  np.testing.assert_array_equal(layers.pool(x, "max", 2, 2),
                                nn.max_pool(x, (2, 2), (2, 2)))  # 5 rows: flax's VALID pool


def test_tile_max_pool_refuses_maps_that_are_not_whole_tiles():
  with pytest.raises(ValueError, match="multiples of k=2"):
    layers.tile_max_pool(jnp.zeros((1, 5, 4, 2)), 2)


def test_pool_rejects_unknown_kind():
  with pytest.raises(ValueError, match="pool"):
    layers.pool(_x(), "min", 2, 2)


def test_global_avg_pool():
  x = _x()
  y = layers.global_avg_pool(x)
  chex.assert_shape(y, (X_SHAPE[0], X_SHAPE[3]))
  np.testing.assert_allclose(y, np.asarray(x).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(layers.global_avg_pool(jnp.ones((1, 3, 5, 2)) * 7.0), 7.0)

"""float32 by default, float64 under jax_enable_x64; the switch is restored."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asymml_jax import precision
from asymml_jax.models import get_model


def test_float_dtype_follows_x64_and_computing_in_restores_it():
  assert precision.float_dtype() == np.float32
  with precision.computing_in("float64"):
    assert precision.float_dtype() == np.float64
    assert jnp.ones(()).dtype == jnp.float64
  assert precision.float_dtype() == np.float32
  with pytest.raises(RuntimeError, match="inside"):
    with precision.computing_in("float64"):
      raise RuntimeError("inside")
  assert not jax.config.jax_enable_x64  # restored on the way out of an error too


def test_unknown_dtype_is_refused_before_anything_changes():
  with pytest.raises(ValueError, match="float32, float64"):
    with precision.computing_in("bfloat16"):
      pass
  assert not jax.config.jax_enable_x64


def test_cast_floats_casts_float_leaves_only():
  tree = {"w": np.ones((2,), np.float32), "n": np.arange(3, dtype=np.int32),
          "s": jax.ShapeDtypeStruct((4,), jnp.float32),
          "i": jax.ShapeDtypeStruct((4,), jnp.int32)}
  out = precision.cast_floats(tree, np.float64)
  assert out["w"].dtype == np.float64 and out["s"].dtype == np.float64
  assert out["n"] is tree["n"] and out["i"] is tree["i"]
  assert precision.cast_floats(tree, np.float32)["w"] is tree["w"]  # no copy


def test_float64_parameters_start_from_the_float32_values():
  model = get_model("vgg11", width=0.125)
  v32 = model.init(jax.random.key(3))
  with precision.computing_in("float64"):
    v64 = model.init(jax.random.key(3))
  for a, b in zip(jax.tree_util.tree_leaves(v32), jax.tree_util.tree_leaves(v64)):
    assert a.dtype == jnp.float32 and b.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b))

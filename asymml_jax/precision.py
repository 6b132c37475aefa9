"""The library's floating-point precision: float32, or float64 for verification.

Training and serving compute in float32.  With ``jax_enable_x64`` on, every
model, stage, signature and bridge tensor uses float64 instead
(``docs/design.md``, "Verification"): in float64 no ReLU pre-activation flips
sign at float32 rounding, so the split network must match the dense one to
about 1e-10, the sharp form of the central invariant.  Parameters are still
drawn in float32 and then cast, so both precisions start from the same values.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = ("float32", "float64")


def float_dtype() -> np.dtype:
  """float64 when ``jax_enable_x64`` is on, else float32."""
  return np.dtype(np.float64 if jax.config.jax_enable_x64 else np.float32)


def check_dtype(name: str) -> str:
  """``name`` if it is one of :data:`DTYPES`; else ``ValueError``."""
  if name not in DTYPES:
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
  return name


@contextlib.contextmanager
def computing_in(name: str) -> Iterator[None]:
  """Sets ``jax_enable_x64`` for ``name`` process-wide, and restores it after.

  Process-wide, not a thread-local context: the host callbacks of the split
  backends run on threads of their own and must see the same precision.
  """
  previous = bool(jax.config.jax_enable_x64)
  jax.config.update("jax_enable_x64", check_dtype(name) == "float64")
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)


def cast_floats(tree: Any, dtype: Any = None) -> Any:
  """Every floating leaf of ``tree`` as ``dtype`` (default :func:`float_dtype`)."""
  dtype = float_dtype() if dtype is None else np.dtype(dtype)

  def cast(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(leaf.shape, dtype) if jnp.issubdtype(
          leaf.dtype, jnp.floating) else leaf
    if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) and np.dtype(
        jnp.result_type(leaf)) != dtype:
      return leaf.astype(dtype) if hasattr(leaf, "astype") else np.asarray(leaf, dtype)
    return leaf
  return jax.tree_util.tree_map(cast, tree)

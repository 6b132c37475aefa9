"""The Gaussian mechanism on residuals (DESIGN section 7, "Mechanism").

Inside the TEE, each residual that is about to leave is clipped per sample to
L2 norm ``c`` and perturbed with Gaussian noise:

    R_i  ->  R_i * min(1, c / ||R_i||_2) + N(0, (sigma c)^2 I)

so that one release of sample ``i`` has L2 sensitivity ``c`` (add/remove one
sample changes one clipped residual by at most ``c`` in norm) and noise of
standard deviation ``sigma c``: a Gaussian mechanism with noise multiplier
``sigma`` (accounted in :mod:`asymml_jax.privacy.accounting`).

Randomness: the caller passes the key (derived in the TEE from its one seed,
e.g. ``fold_in(fold_in(key, step), release)``, DESIGN section 11); there is no
default key, and ``None`` is refused.  Every release must use a fresh key:
reusing one would reuse the noise and void the accounting.

Per-sample keys: the noise of sample ``i`` is drawn from
``jax.random.fold_in(key, sample_ids[i])`` (``sample_ids`` defaults to the
batch positions ``0 .. B-1``).  It therefore depends only on the release key
and the sample's id, never on the batch size, on the sample's position or on
the other samples: sample ``i`` computed alone with ``sample_ids=[i]`` gets
exactly the noise it gets inside the batch.

Everything is pure and jittable, with ``clip`` and ``noise_multiplier`` as
static Python floats.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from asymml_jax.decomposition import clip_per_sample


def _check_key(key) -> None:
  if key is None:
    raise ValueError(
        "a PRNG key is required for the DP noise (DESIGN section 7: keys come "
        "from the TEE's RNG, never a default key); got None")


def _check_params(clip: float, noise_multiplier: float) -> None:
  if not (isinstance(clip, numbers.Real) and math.isfinite(clip) and clip > 0):
    raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
  if not (isinstance(noise_multiplier, numbers.Real)
          and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
    raise ValueError(
        f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")


def _sample_ids(batch_size: int, sample_ids) -> jax.Array:
  if sample_ids is None:
    return jnp.arange(batch_size, dtype=jnp.uint32)
  sample_ids = jnp.asarray(sample_ids)
  if sample_ids.shape != (batch_size,):
    raise ValueError(
        f"sample_ids must have shape ({batch_size},), got {sample_ids.shape}")
  if not jnp.issubdtype(sample_ids.dtype, jnp.integer):
    raise ValueError(f"sample_ids must be integers, got {sample_ids.dtype}")
  return sample_ids


def noise_std(clip: float, noise_multiplier: float) -> float:
  """Standard deviation ``sigma * c`` of the Gaussian noise (DESIGN section 7).

  Args:
    clip: L2 bound ``c > 0`` of one release (its sensitivity).
    noise_multiplier: ``sigma >= 0``.

  Returns:
    ``sigma * c``.

  >>> noise_std(2.0, 0.5)
  1.0
  """
  _check_params(clip, noise_multiplier)
  return float(noise_multiplier) * float(clip)


def sample_keys(key: jax.Array, batch_size: int,
                sample_ids: jax.Array | None = None) -> jax.Array:
  """One key per sample: ``fold_in(key, sample_ids[i])``.

  Args:
    key: the release key (from the TEE's RNG; required).
    batch_size: ``B``.
    sample_ids: ``(B,)`` integer ids; defaults to ``arange(B)``.

  Returns:
    ``B`` keys, stacked (same key type as ``key``).
  """
  _check_key(key)
  sample_ids = _sample_ids(batch_size, sample_ids)
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(sample_ids)


def per_sample_noise(key: jax.Array, shape: tuple[int, ...], *,
                     std: float = 1.0, dtype=jnp.float32,
                     sample_ids: jax.Array | None = None) -> jax.Array:
  """Gaussian noise ``N(0, std^2 I)`` of ``shape = (B, ...)``, one key per sample.

  Row ``i`` is ``std * normal(fold_in(key, sample_ids[i]), shape[1:])``, so it
  does not depend on ``B`` or on the other rows.

  Args:
    key: the release key (required).
    shape: ``(B, ...)``.
    std: standard deviation.
    dtype: floating dtype of the noise.
    sample_ids: ``(B,)`` integer ids; defaults to ``arange(B)``.

  Returns:
    The noise, ``shape`` and ``dtype``.
  """
  keys = sample_keys(key, shape[0], sample_ids)
  z = jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(keys)
  return z * jnp.asarray(std, dtype)


def clip_and_noise(residual: jax.Array, key: jax.Array, *, clip: float,
                   noise_multiplier: float,
                   sample_ids: jax.Array | None = None) -> jax.Array:
  """The DP release ``clip(R) + N(0, (sigma c)^2 I)`` (DESIGN sections 3 and 7).

  Step 1 of the forward stage in DESIGN section 3: per-sample L2 clipping to
  ``c`` (:func:`asymml_jax.decomposition.clip_per_sample`), then independent
  Gaussian noise of standard deviation ``sigma * c`` for every element, drawn
  per sample from ``fold_in(key, sample_ids[i])`` (see the module docstring).

  Args:
    residual: ``(B, ...)`` residuals ``R = X - U U^T X``.
    key: the release key, from the TEE's RNG; required (``None`` raises).  Use
      a fresh key for every release.
    clip: L2 bound ``c > 0`` per sample and release (static).
    noise_multiplier: ``sigma >= 0`` (static); ``0`` clips only.
    sample_ids: ``(B,)`` integer ids selecting each sample's noise stream;
      defaults to the batch positions ``arange(B)``.

  Returns:
    The released residual, same shape and dtype as ``residual``.

  Raises:
    ValueError: for a ``None`` key, ``clip <= 0``, ``noise_multiplier < 0`` or
      malformed ``sample_ids``.
  """
  _check_key(key)
  _check_params(clip, noise_multiplier)
  clipped = clip_per_sample(residual, clip)
  if noise_multiplier == 0:
    _sample_ids(residual.shape[0], sample_ids)  # same calls accepted either way
    return clipped
  noise = per_sample_noise(key, residual.shape, std=noise_std(clip, noise_multiplier),
                           dtype=residual.dtype, sample_ids=sample_ids)
  return clipped + noise


def release_norms_before_noise(residual: jax.Array, clip: float) -> jax.Array:
  """Per-sample L2 norms of the clipped residual, before the noise is added.

  Each is ``min(||R_i||, c)`` up to rounding: the sensitivity bound the
  accountant relies on (for tests and the boundary ledger).

  Args:
    residual: ``(B, ...)`` residuals.
    clip: L2 bound ``c > 0``.

  Returns:
    ``(B,)`` norms.
  """
  clipped = clip_per_sample(residual, clip)
  flat = clipped.reshape(clipped.shape[0], -1)
  return jnp.sqrt(jnp.sum(flat * flat, axis=1))

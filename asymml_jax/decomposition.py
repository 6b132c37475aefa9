"""Principal-channel decomposition of activations (DESIGN section 3, "Subspace").

An activation of one sample, ``X in R^{H x W x C}``, is viewed as the matrix
``X in R^{C x HW}`` (channels by pixels).  AsymML (3LegRace, PETS 2022,
section 4.1) splits it into a low-rank part ``X_L = U U^T X`` whose ``r``
"principal channels" ``P = U^T X`` stay in the trusted execution environment,
and a residual ``R = X - X_L`` that is sent to the untrusted accelerator.

Everything here is a pure, jittable function with static shapes: the rank is
chosen by energy at run time but ``U`` always has ``r_max`` columns, the unused
ones set to zero (masked), so ``X_L`` and ``R`` are exact for any chosen rank.

Arrays use the NHWC layout of JAX/Flax.  A single sample's pixel matrix is
handled as ``x2d in R^{N x C}`` (``N = HW`` rows), i.e. ``X^T``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Scope = Literal["per_sample", "per_batch"]
OVERSAMPLE = 2
# Full float32 products (no TF32/bf16 passes on accelerators): X_L + R = X must
# hold to float32 rounding on every backend.
_HIGHEST = jax.lax.Precision.HIGHEST
SCOPES: tuple[str, ...] = ("per_sample", "per_batch")
# ``fraction``: r_max from rank_fraction; ``calibrate``: each site's static rank
# from a calibration batch's energy (asymml_jax.calibration).
RANK_PLANS: tuple[str, ...] = ("fraction", "calibrate")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecompositionConfig:
  """How activations are decomposed (DESIGN section 3).

  Attributes:
    rank_fraction: ``r_max = max(min_rank, ceil(rank_fraction * C))``.
    max_rank: optional cap on ``r_max`` (the authors capped at 32).
    min_rank: lower bound on ``r_max``.
    tau: energy threshold: the smallest ``r <= r_max`` whose residual energy is
      ``<= tau`` of the total is used; ``0`` always uses ``r_max``.
    num_iters: block subspace iterations (1-3 suffice with a Rayleigh-Ritz step).
    scope: ``per_sample`` (one ``U`` per sample; the only scope allowed with DP)
      or ``per_batch`` (one ``U`` for the whole batch).
    verify_untrusted: the trusted stages check every result of the split
      convolutions that comes back from the accelerator (``conv(R, W)``
      forward, the residual gradient ``conv^T(dY_R, W)`` backward) with a
      Freivalds test and raise :class:`asymml_jax.integrity.IntegrityError`
      on a wrong one (DESIGN section 6).  Off, nothing is checked and the
      compiled programs are those of a plan without the field.
    rank_plan: ``fraction`` (``r_max`` from ``rank_fraction``, fixed before any
      data is seen) or ``calibrate``: the trusted executor measures each
      site's energy spectrum on the first batch it serves and compiles with
      the smallest static rank that leaves at most ``tau`` of every sample's
      energy in the residual, capped by ``max_rank`` and below ``min(C, HW)``
      (:mod:`asymml_jax.calibration`).
  """

  rank_fraction: float = 1.0 / 16.0
  max_rank: int | None = None
  min_rank: int = 1
  tau: float = 0.1
  num_iters: int = 2
  scope: str = "per_sample"
  verify_untrusted: bool = False
  rank_plan: str = "fraction"

  def __post_init__(self):
    if not 0.0 < self.rank_fraction <= 1.0:
      raise ValueError(f"rank_fraction must be in (0, 1], got {self.rank_fraction}")
    if self.min_rank < 1:
      raise ValueError(f"min_rank must be >= 1, got {self.min_rank}")
    if self.max_rank is not None and self.max_rank < self.min_rank:
      raise ValueError(
          f"max_rank ({self.max_rank}) must be >= min_rank ({self.min_rank})")
    if not 0.0 <= self.tau < 1.0:
      raise ValueError(f"tau must be in [0, 1), got {self.tau}")
    if not 1 <= self.num_iters <= 10:
      raise ValueError(f"num_iters must be in [1, 10], got {self.num_iters}")
    if self.scope not in SCOPES:
      raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
    if not isinstance(self.verify_untrusted, bool):
      raise ValueError(f"verify_untrusted must be a bool, got {self.verify_untrusted!r}")
    if self.rank_plan not in RANK_PLANS:
      raise ValueError(f"rank_plan must be one of {RANK_PLANS}, got {self.rank_plan!r}")
    if self.rank_plan == "calibrate" and self.tau <= 0.0:
      raise ValueError("rank_plan='calibrate' needs an energy threshold tau > 0")

  def r_max(self, channels: int) -> int:
    """The static number of columns of ``U`` for ``channels`` input channels."""
    # Round away float noise before the ceiling (0.07 * 100 = 7.000000000000001).
    r = max(self.min_rank, math.ceil(round(self.rank_fraction * channels, 9)))
    if self.max_rank is not None:
      r = min(r, self.max_rank)
    return min(r, channels)


class Decomposition(NamedTuple):
  """Result of decomposing a batch of activations.

  Attributes:
    u: principal channels, ``(B, C, r_max)`` per sample or ``(C, r_max)`` per
      batch; columns beyond the chosen rank are zero.  Constant for autodiff.
    p: principal-channel maps ``P = X U``, ``(B, H, W, r_max)``.
    residual: ``R = X - P U^T``, ``(B, H, W, C)``.
    rank: chosen rank, ``(B,)`` per sample or ``()`` per batch.
  """

  u: jax.Array
  p: jax.Array
  residual: jax.Array
  rank: jax.Array


def subspace_iteration(x2d: jax.Array, q0: jax.Array, num_iters: int) -> jax.Array:
  """Block subspace iteration on ``X X^T`` without forming it.

  Implements ``Q <- orth(X (X^T Q))`` (DESIGN section 3), with ``X = x2d^T``.

  Args:
    x2d: ``(N, C)`` pixel-by-channel matrix of one sample (or of a batch).
    q0: ``(C, r)`` start block (random or warm start).
    num_iters: number of iterations.

  Returns:
    ``(C, r)`` orthonormal basis approximating the top-``r`` left singular
    subspace of ``X``.
  """
  q = q0
  for _ in range(num_iters):
    z = rows_dot(x2d, x2d @ q)  # (C, r) = X X^T Q
    q, _ = jnp.linalg.qr(z)
  return q


def rows_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a^T b`` over the rows of ``a`` ``(N, C)`` and ``b`` ``(N, k)``: ``(C, k)``.

  Computed as ``(b^T a)^T`` with optimization barriers around it, so that
  XLA CPU lays the product out with ``a``'s ``C`` minor and does not fold
  the transpose into the product that made ``b``.  Left to itself it picks
  kernels that run 5-9x slower (``N = 3136, C = 256, k = 5``, batch 4: 6.9
  against 0.8 ms on one core); in :func:`subspace_iteration` the folded
  ``x2d @ q`` turned into ``(q^T x2d^T)`` at 4x the cost.
  """
  b = jax.lax.optimization_barrier(b)
  return jax.lax.optimization_barrier(jnp.matmul(b.T, a, precision=_HIGHEST)).T


def rayleigh_ritz(x2d: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rotates ``q`` to the Ritz vectors of ``X X^T``, sorted by energy.

  Solves the small ``r x r`` eigenproblem of ``Q^T X X^T Q``; the returned
  energies are the squared norms of the principal-channel maps, so that
  ``sum(x2d**2) - cumsum(energies)`` is the residual energy at each rank.

  Returns:
    ``(q_sorted, energies)`` with energies descending.
  """
  p = jax.lax.optimization_barrier(x2d @ q)  # see rows_dot
  b = p.T @ p
  evals, evecs = jnp.linalg.eigh(b)
  evals = evals[::-1]
  evecs = evecs[:, ::-1]
  return q @ evecs, jnp.maximum(evals, 0.0)


def energy_rank(energies: jax.Array, total: jax.Array, tau: float,
                min_rank: int = 1) -> jax.Array:
  """Smallest rank whose residual energy is ``<= tau * total`` (or ``r_max``).

  Args:
    energies: ``(r_max,)`` captured energy per component, descending.
    total: total energy ``||X||_F^2``.
    tau: residual-energy threshold in ``[0, 1)``.
    min_rank: lower bound on the returned rank.

  Returns:
    An int32 scalar in ``[min_rank, r_max]``.
  """
  r_max = energies.shape[0]
  residual = total - jnp.cumsum(energies)  # residual energy at rank 1..r_max
  ok = residual <= tau * total
  first = jnp.argmax(ok)  # index of first True, 0 if none
  rank = jnp.where(jnp.any(ok), first + 1, r_max)
  return jnp.clip(rank, min(min_rank, r_max), r_max).astype(jnp.int32)


def gram_subspace(gram: jax.Array, q0: jax.Array, num_iters: int
                  ) -> tuple[jax.Array, jax.Array]:
  """:func:`subspace_iteration` then :func:`rayleigh_ritz` on a formed ``X X^T``.

  The same iteration ``Q <- orth(G Q)`` and Ritz step ``eig(Q^T G Q)`` with
  ``G = X X^T`` (``C x C``) formed once: one pass over the activations
  instead of ``2 num_iters + 1``.  For tall ``x2d`` (many pixels, few
  channels: the high-resolution layers) that pass is a compute-efficient
  matrix product, while the thin products of the iteration are bound by
  memory bandwidth (1.4x faster at 224x224x64 on XLA CPU).
  """
  q = q0
  for _ in range(num_iters):
    q, _ = jnp.linalg.qr(jnp.matmul(gram, q, precision=_HIGHEST))
  b = jnp.matmul(q.T, jnp.matmul(gram, q, precision=_HIGHEST), precision=_HIGHEST)
  evals, evecs = jnp.linalg.eigh(b)
  return q @ evecs[:, ::-1], jnp.maximum(evals[::-1], 0.0)


# Form X X^T when a sample has at least this many pixels per channel
# (measured crossover on XLA CPU: 16-32; see gram_subspace and rows_dot).
GRAM_MIN_PIXELS_PER_CHANNEL = 16
# The subspace is estimated from at most about this many pixels per channel
# (see pixel_sample).
SUBSPACE_PIXELS_PER_CHANNEL = 32
SUBSPACE_MIN_PIXELS = 1024


def sample_rows(channels: int) -> int:
  """How many pixel rows the subspace is estimated from: ``max(32 C, 1024)``."""
  return max(SUBSPACE_PIXELS_PER_CHANNEL * channels, SUBSPACE_MIN_PIXELS)


def pixel_sample(x2d: jax.Array) -> jax.Array:
  """Every ``s``-th pixel row of ``x2d``, ``s = ceil(N / sample_rows(C))``.

  Any ``U`` keeps the split exact (``X_L + R = X`` for every ``U``); only the quality of the
  subspace depends on it, and ``C x C`` statistics need far fewer than the
  50,176 pixels of a 224x224 map.  A strided sample reads a fraction of the
  activation's cache lines: at 224x224x64 the Gram costs 1/25 of the full
  one (0.82 GMAC per batch of 4).  Maps of at most :func:`sample_rows` pixels are used whole.
  The real-photo tests hold the estimate to 99% of the exact SVD's energy.
  """
  n, c = x2d.shape
  stride = -(-n // sample_rows(c))
  return x2d[::stride] if stride >= 2 else x2d


def _basis(x2d: jax.Array, q0: jax.Array, num_iters: int, tau: float,
           min_rank: int, r_max: int) -> tuple[jax.Array, jax.Array]:
  x2d = pixel_sample(x2d)
  if x2d.shape[0] >= GRAM_MIN_PIXELS_PER_CHANNEL * x2d.shape[1]:
    gram = jnp.matmul(x2d.T, x2d, precision=_HIGHEST)
    q, energies = gram_subspace(gram, q0, num_iters)
    total = jnp.trace(gram)
  else:
    q = subspace_iteration(x2d, q0, num_iters)
    q, energies = rayleigh_ritz(x2d, q)
    total = jnp.sum(x2d * x2d)
  q, energies = q[:, :r_max], energies[:r_max]  # drop the oversampling columns
  rank = energy_rank(energies, total, tau, min_rank)
  mask = jnp.arange(r_max) < rank
  return q * mask[None, :].astype(q.dtype), rank


def principal_channels(x: jax.Array, key: jax.Array, r_max: int, *,
                       tau: float = 0.0, num_iters: int = 2,
                       scope: str = "per_sample", min_rank: int = 1,
                       q0: jax.Array | None = None,
                       oversample: int = OVERSAMPLE) -> tuple[jax.Array, jax.Array]:
  """Finds the principal channels ``U`` of a batch of NHWC activations.

  Args:
    x: ``(B, H, W, C)`` activations.
    key: PRNG key for the random start block (used when ``q0`` is None).
    r_max: static number of columns.
    tau: energy threshold of :func:`energy_rank`.
    num_iters: subspace iterations.
    scope: ``per_sample`` or ``per_batch``.
    min_rank: lower bound on the chosen rank.
    q0: optional warm start, ``(B, C, k)`` or ``(C, k)`` by scope, with
      ``r_max <= k <= C`` columns (extra columns act as oversampling).
    oversample: extra start columns when ``q0`` is None (randomised range
      finder practice: the top ``r_max`` Ritz vectors of an ``r_max + p`` block
      are far more reliable per sample than those of an ``r_max`` block).

  Returns:
    ``(u, rank)``; ``u`` is treated as a constant (``stop_gradient``), which is
    exact because ``X_L + R = X`` identically (DESIGN section 1).
  """
  if scope not in SCOPES:
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
  b, h, w, c = x.shape
  if not 1 <= r_max <= c:
    raise ValueError(f"r_max must be in [1, C={c}], got {r_max}")
  xs = jax.lax.stop_gradient(x).astype(jnp.promote_types(x.dtype, jnp.float32))
  cols = min(c, r_max + max(0, oversample))
  if scope == "per_sample":
    if q0 is None:
      q0 = jax.random.normal(key, (b, c, cols), xs.dtype)
    # One sample at a time, not vmap: a batched QR or eigh large enough is split
    # by LAPACK over XLA's CPU pool and waits for it, which deadlocks when a
    # host callback (the local backend) holds the pool's other thread.
    u, rank = jax.lax.map(
        lambda xq: _basis(xq[0], xq[1], num_iters, tau, min_rank, r_max),
        (xs.reshape(b, h * w, c), q0))
  else:
    if q0 is None:
      q0 = jax.random.normal(key, (c, cols), xs.dtype)
    u, rank = _basis(xs.reshape(b * h * w, c), q0, num_iters, tau, min_rank, r_max)
  return jax.lax.stop_gradient(u.astype(x.dtype)), rank


def project(x: jax.Array, u: jax.Array) -> jax.Array:
  """Principal-channel maps ``P = U^T X`` in NHWC: ``(B, H, W, r)``."""
  if u.ndim == 3:
    return jnp.einsum("bhwc,bcr->bhwr", x, u, precision=_HIGHEST)
  return jnp.einsum("bhwc,cr->bhwr", x, u, precision=_HIGHEST)


def reconstruct(p: jax.Array, u: jax.Array) -> jax.Array:
  """Low-rank part ``X_L = U P`` in NHWC: ``(B, H, W, C)``."""
  if u.ndim == 3:
    return jnp.einsum("bhwr,bcr->bhwc", p, u, precision=_HIGHEST)
  return jnp.einsum("bhwr,cr->bhwc", p, u, precision=_HIGHEST)


# Ranks up to this form the residual in one elementwise pass over ``X``
# (measured on XLA CPU: 1.8x faster at 224x224x64, r = 4; slower at r = 16).
FUSED_RESIDUAL_MAX_RANK = 8


def residual(x: jax.Array, p: jax.Array, u: jax.Array) -> jax.Array:
  """``R = X - P U^T`` (the released residual), fused for small ``r``.

  For ``r <= FUSED_RESIDUAL_MAX_RANK`` the ``r`` rank-one updates are written
  as elementwise products, which XLA fuses into a single loop: one read of
  ``X`` and ``P`` and one write of ``R``, instead of a matrix product that
  writes ``X_L`` and a subtraction that reads it back.
  """
  r = u.shape[-1]
  if r > FUSED_RESIDUAL_MAX_RANK:
    return x - reconstruct(p, u)
  ub = u[:, None, None] if u.ndim == 3 else u  # (B, 1, 1, C, r) or (C, r)
  out = x
  for j in range(r):
    out = out - p[..., j:j + 1] * ub[..., j]
  return out


def decompose(x: jax.Array, key: jax.Array, r_max: int, *, tau: float = 0.0,
              num_iters: int = 2, scope: str = "per_sample", min_rank: int = 1,
              q0: jax.Array | None = None) -> Decomposition:
  """Splits ``X`` into ``P`` (kept trusted) and ``R = X - U P`` (sent out).

  Implements ``X = X_L + R`` with ``X_L = U U^T X`` (DESIGN section 1).
  """
  u, rank = principal_channels(x, key, r_max, tau=tau, num_iters=num_iters,
                               scope=scope, min_rank=min_rank, q0=q0)
  p = project(x, u)
  return Decomposition(u=u, p=p, residual=residual(x, p, u), rank=rank)


def energy_fraction(x: jax.Array, u: jax.Array) -> jax.Array:
  """Per-sample fraction of ``||X||^2`` captured by ``U`` (``(B,)``)."""
  p = project(x, u)
  axes = tuple(range(1, x.ndim))
  return jnp.sum(p * p, axis=axes) / jnp.maximum(jnp.sum(x * x, axis=axes), 1e-30)


def clip_per_sample(r: jax.Array, clip: float) -> jax.Array:
  """Per-sample L2 clipping: ``r_i * min(1, clip / ||r_i||)`` (DESIGN section 7).

  Args:
    r: ``(B, ...)`` residuals.
    clip: L2 bound ``c > 0``.

  Returns:
    Residuals whose per-sample L2 norm is at most ``clip``.
  """
  if clip <= 0:
    raise ValueError(f"clip must be > 0, got {clip}")
  axes = tuple(range(1, r.ndim))
  norms = jnp.sqrt(jnp.sum(r * r, axis=axes, keepdims=True))
  scale = jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-12))
  return r * scale

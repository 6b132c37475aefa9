"""Gradient protection: only the residual of each output gradient leaves (DESIGN section 3).

Without protection the accelerator receives the full output gradient ``dY`` of
every split convolution (to compute ``conv^T(dY, W)`` and ``corr(R, dY)``), and
``dY``'s zero pattern is the ReLU mask of private pre-activations.  With
``gradient_protection='decompose'`` the TEE decomposes ``dY`` per sample over
its output channels, ``dY = dY_L + dY_R`` with ``dY_L = Q Q^T dY`` (``Q``:
``Cout x r`` principal output channels, found by the same subspace iteration as
activations, :mod:`asymml_jax.decomposition`), releases only ``dY_R``
(per-sample clipped and noised when DP is on, :mod:`asymml_jax.privacy.noise`)
and computes the low-rank shares itself (DESIGN section 3, "Backward"):

* accelerator: ``conv^T(dY_R, W)`` and ``corr(R, dY_R)`` (ordinary autodiff of
  its ``conv(R, W)``, fed ``dY_R`` as cotangent);
* TEE: ``conv^T(dY_L, W) = conv^T(Q^T dY, W Q)`` (a kernel folded over output
  channels: ``r / Cout`` of the dense cost) and
  ``corr(R, dY_L) = corr(R, Q^T dY) Q^T``; ``corr(X_L, dY)`` comes from the
  low-rank convolution's own autodiff.

:func:`protect_output` wires this into autodiff: it is the identity on the
accelerator's ``Y_R`` in the forward pass, and its VJP turns the incoming
``dY`` into the released ``dY_R`` (cotangent of ``Y_R``) plus the TEE's shares
(cotangents of the released residual ``R`` and of the kernel ``W``).  With
noise off the total gradient is exactly the dense one (up to float rounding).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from asymml_jax import decomposition as dec
from asymml_jax import ops
from asymml_jax.privacy import noise as noise_lib

GRADIENT_SUBSPACE = 0   # fold_in tag of the subspace-iteration start block
GRADIENT_NOISE = 1      # fold_in tag of the release noise


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradientRelease:
  """Static settings of one protected output gradient (hashable; jit-static).

  Attributes:
    spec: the convolution whose output gradient is protected.
    r_max: static number of principal output channels kept in the TEE.
    tau: energy threshold for the rank (:func:`asymml_jax.decomposition.energy_rank`).
    num_iters: subspace iterations.
    min_rank: lower bound on the rank.
    clip: per-sample L2 bound of the released ``dY_R``; ``None``: no clipping
      and no noise (DP off).
    noise_multiplier: ``sigma``; noise std ``sigma * clip``.
  """

  spec: ops.ConvSpec
  r_max: int
  tau: float = 0.0
  num_iters: int = 2
  min_rank: int = 1
  clip: float | None = None
  noise_multiplier: float = 0.0

  def __post_init__(self):
    if not 1 <= self.r_max <= self.spec.features:
      raise ValueError(f"r_max must be in [1, {self.spec.features}], got {self.r_max}")
    if self.clip is not None and not self.clip > 0:
      raise ValueError(f"clip must be > 0 or None, got {self.clip}")
    if self.noise_multiplier and self.clip is None:
      raise ValueError("noise needs a clip bound (the noise std is sigma * clip)")


def split_output_gradient(dy: jax.Array, key: jax.Array, cfg: GradientRelease):
  """``dY = dY_L + dY_R`` per sample over output channels, and the release of ``dY_R``.

  Args:
    dy: ``(B, Ho, Wo, Cout)`` output gradient.
    key: the TEE's key for this gradient (subspace start and noise are
      ``fold_in(key, GRADIENT_SUBSPACE)`` / ``fold_in(key, GRADIENT_NOISE)``).
    cfg: static settings.

  Returns:
    ``(decomposition of dY, released dY_R)``; the released tensor is
    ``clip(dY_R) + N(0, (sigma clip)^2 I)`` when ``cfg.clip`` is set, else ``dY_R``.
  """
  d = dec.decompose(dy, jax.random.fold_in(key, GRADIENT_SUBSPACE), cfg.r_max,
                    tau=cfg.tau, num_iters=cfg.num_iters, scope="per_sample",
                    min_rank=cfg.min_rank)
  released = d.residual
  if cfg.clip is not None:
    released = noise_lib.clip_and_noise(released, jax.random.fold_in(key, GRADIENT_NOISE),
                                        clip=cfg.clip, noise_multiplier=cfg.noise_multiplier)
  return d, released


def trusted_gradient_shares(r: jax.Array, kernel: jax.Array, p: jax.Array, q: jax.Array,
                            spec: ops.ConvSpec) -> tuple[jax.Array, jax.Array]:
  """The TEE's shares ``conv^T(dY_L, W)`` and ``corr(R, dY_L)`` at ``r / Cout`` cost.

  With ``dY_L = P Q^T`` per sample (``P = dY Q``), both go through the kernel
  folded over output channels ``W Q`` (``kh x kw x C x r``):
  ``conv^T(dY_L, W) = conv^T(P, W Q)`` and ``corr(R, dY_L) = corr(R, P) Q^T``.

  Args:
    r: ``(B, H, W, C)`` the released residual (what the accelerator convolved).
    kernel: ``(kh, kw, C, Cout)``.
    p: ``(B, Ho, Wo, r)`` principal output-channel maps of ``dY``.
    q: ``(B, Cout, r)`` principal output channels.
    spec: the convolution's geometry.

  Returns:
    ``(dR (B, H, W, C), dW (kh, kw, C, Cout))``.
  """
  folded = jnp.einsum("hwco,bor->bhwcr", kernel, q,
                      precision=jax.lax.Precision.HIGHEST).astype(r.dtype)
  p = p.astype(r.dtype)
  if _unit_stride(spec):
    dr, dfolded = _unit_stride_shares(r, folded, p, spec)
  else:
    def one(r1, k1, p1):
      _, vjp = jax.vjp(lambda x, k: ops.conv(x[None], k, spec.strides, spec.padding)[0],
                       r1, k1)
      return vjp(p1)
    dr, dfolded = jax.vmap(one)(r, folded, p)
  dw = jnp.einsum("bhwcr,bor->hwco", dfolded, q.astype(dfolded.dtype),
                  precision=jax.lax.Precision.HIGHEST)
  return dr, dw.astype(kernel.dtype)


def _unit_stride(spec: ops.ConvSpec) -> bool:
  """Stride 1 with padding in ``[0, k - 1]`` on every side (a plain transposed conv)."""
  (pt, pb), (pl, pr) = spec.padding
  kh, kw = spec.kernel_size
  return spec.strides == (1, 1) and all(0 <= v < kh for v in (pt, pb)) and all(
      0 <= v < kw for v in (pl, pr))


def _unit_stride_shares(r: jax.Array, folded: jax.Array, p: jax.Array,
                        spec: ops.ConvSpec) -> tuple[jax.Array, jax.Array]:
  """``conv^T(P, W Q)`` and ``corr(R, P)`` per sample as batched matrix products.

  The transposed convolution is the per-sample convolution of ``P`` with the
  flipped kernel (input and output channels swapped) and the complementary
  padding.  The correlation ``sum_y R_pad[y] P[y - t]`` over the padded grid
  is one ``(kh kw r) x C`` product of ``P``'s shifted patches with ``R_pad``.
  (A vmapped per-sample VJP becomes grouped convolutions, which XLA CPU runs
  far below its dense speed.)
  """
  (pt, pb), (pl, pr) = spec.padding
  kh, kw = spec.kernel_size
  b, _, _, c = r.shape
  ho, wo, rank = p.shape[1:]
  flipped = jnp.swapaxes(folded[:, ::-1, ::-1], 3, 4)  # (B, kh, kw, r, C)
  dr = ops.per_sample_conv(p, flipped, (1, 1),
                           ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)))
  rp = jnp.pad(r, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  hp, wp = rp.shape[1:3]
  pp = jnp.pad(p, ((0, 0), (kh - 1, hp - ho), (kw - 1, wp - wo), (0, 0)))
  patches = ops.shifted_patches(pp, (kh, kw), (1, 1), ((0, 0), (0, 0)))  # tap (kh-1-i, kw-1-j)
  corr = jnp.einsum("bnk,bnc->bkc", patches.reshape(b, hp * wp, kh * kw * rank),
                    rp.reshape(b, hp * wp, c), precision=jax.lax.Precision.HIGHEST)
  corr = corr.reshape(b, kh, kw, rank, c)[:, ::-1, ::-1]
  return dr, jnp.swapaxes(corr, 3, 4)  # (B, kh, kw, C, r)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def protect_output(yr: jax.Array, r: jax.Array, kernel: jax.Array, key: jax.Array,
                   cfg: GradientRelease) -> jax.Array:
  """Identity on ``Y_R = conv(R, W)``; its VJP releases only ``dY_R`` (module docstring).

  Args:
    yr: the accelerator's ``conv(R, W)``.
    r: the residual the TEE released for this convolution (kept in the TEE).
    kernel: the convolution's kernel ``W``.
    key: the TEE's key for this output gradient (fresh per step and conv).
    cfg: static settings.

  Returns:
    ``yr`` unchanged.  Cotangents: ``dY_R`` (released) for ``yr``,
    ``conv^T(dY_L, W)`` for ``r``, ``corr(R, dY_L)`` for ``kernel``.
  """
  del r, kernel, key, cfg
  return yr


def _protect_fwd(yr, r, kernel, key, cfg):
  return yr, (r, kernel, key)


def _protect_bwd(cfg, res, dy):
  r, kernel, key = res
  d, released = split_output_gradient(dy, key, cfg)
  dr, dw = trusted_gradient_shares(r, kernel, d.p, d.u, cfg.spec)
  return released.astype(dy.dtype), dr, dw, None


protect_output.defvjp(_protect_fwd, _protect_bwd)

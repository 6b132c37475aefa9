"""Flax linen modules built on :mod:`asymml_jax.ops` and :mod:`asymml_jax.decomposition`.

* :class:`AsymConv` is a drop-in replacement for ``nn.Conv`` inside any linen
  model: it decomposes its input (DESIGN section 3, step 1), convolves the
  residual as the accelerator would (step 2), the principal channels with the
  folded kernel as the enclave would (step 3), and adds them (step 4).  With
  noise and clipping off it computes exactly ``nn.Conv``'s function.
* :class:`Norm`, :func:`pool` and :func:`global_avg_pool` are the trusted,
  non-linear or sample-mixing pieces that the staged models (``models/``) use
  in their trusted stages: BatchNorm or GroupNorm on the *full* activation,
  ReLU, max and average pooling (each what it says), padding honoured.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from asymml_jax import decomposition as dec
from asymml_jax import ops

NORMS: tuple[str, ...] = ("batch", "group", "none")


def _explicit_padding(padding, kernel_size: tuple[int, int],
                      strides: tuple[int, int],
                      in_hw: tuple[int, int]) -> ops.Padding:
  if isinstance(padding, str):
    if padding.upper() == "VALID":
      return ((0, 0), (0, 0))
    if padding.upper() == "SAME":
      # As lax/nn.Conv: the pads depend on the input size and the strides.
      (pt, pb), (pl, pr) = jax.lax.padtype_to_pads(in_hw, kernel_size, strides,
                                                   "SAME")
      return ((int(pt), int(pb)), (int(pl), int(pr)))
    raise ValueError(f"padding must be 'SAME', 'VALID' or explicit pairs, got {padding!r}")
  (a, b), (c, d) = padding
  return ((int(a), int(b)), (int(c), int(d)))


class AsymConv(nn.Module):
  """Convolution split into a trusted low-rank half and an untrusted residual half.

  Implements ``conv(X, W) = conv(P, W x_C U) + conv(X - U P, W)`` (DESIGN
  section 1).  Parameters are named like ``nn.Conv``'s (``kernel`` HWIO,
  ``bias``), so weights are interchangeable with a dense model.

  The residual that would leave the enclave is recorded with
  ``self.sow('intermediates', 'residual', R)``.  The random start block of the
  subspace iteration comes from the ``'decompose'`` RNG stream, which the
  caller must provide (no hidden default key).

  Attributes:
    features: output channels.
    kernel_size: ``(kh, kw)``.
    strides: ``(sh, sw)``.
    padding: ``'SAME'``, ``'VALID'`` or explicit pairs.
    use_bias: add a bias (trusted side).
    decomposition: rank rule, energy threshold, iterations and scope.
    split: ``False`` gives the plain dense convolution (for comparisons).
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: str | Sequence[Sequence[int]] = "SAME"
  use_bias: bool = True
  decomposition: dec.DecompositionConfig = dec.DecompositionConfig()
  split: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"AsymConv expects NHWC input, got shape {x.shape}")
    kh, kw = tuple(self.kernel_size)
    c = x.shape[-1]
    spec = ops.ConvSpec(name=self.name or "conv", site="input", in_features=c,
                        features=self.features, kernel_size=(kh, kw),
                        strides=tuple(self.strides),
                        padding=_explicit_padding(self.padding, (kh, kw),
                                                  tuple(self.strides),
                                                  x.shape[1:3]),
                        use_bias=self.use_bias)
    kernel = self.param("kernel", self.kernel_init, (kh, kw, c, self.features))
    bias = (self.param("bias", nn.initializers.zeros, (self.features,))
            if self.use_bias else None)
    if not self.split:
      return ops.combine(None, ops.conv(x, kernel, spec.strides, spec.padding), bias)
    cfg = self.decomposition
    d = dec.decompose(x, self.make_rng("decompose"), cfg.r_max(c), tau=cfg.tau,
                      num_iters=cfg.num_iters, scope=cfg.scope,
                      min_rank=cfg.min_rank)
    self.sow("intermediates", "residual", d.residual)
    y_r = ops.untrusted_conv(d.residual, kernel, spec)
    y_l = ops.lowrank_conv(d.p, d.u, kernel, spec)
    return ops.combine(y_l, y_r, bias)


def group_count(channels: int, max_groups: int = 32) -> int:
  """Largest group count ``<= max_groups`` dividing ``channels`` with >= 2 channels a group."""
  for g in range(min(max_groups, channels // 2), 0, -1):
    if channels % g == 0:
      return g
  return 1


class Norm(nn.Module):
  """Normalisation of the full activation ``Y = Y_L + Y_R + b`` (section 3, step 4).

  ``batch`` is BatchNorm (mixes samples; refused in DP mode), ``group`` is
  GroupNorm (per sample), ``none`` is the identity.  Variances are computed as
  ``E[(x - E[x])^2]``, not Flax's default ``E[x^2] - E[x]^2``, which loses all
  precision for channels whose mean dwarfs their spread (small batches at 1x1
  spatial size), so that the dense and split networks agree to float32 accuracy.
  """

  kind: str = "batch"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.kind == "batch":
      return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                          epsilon=1e-5, use_fast_variance=False)(x)
    if self.kind == "group":
      return nn.GroupNorm(num_groups=group_count(x.shape[-1]), epsilon=1e-5,
                          use_fast_variance=False)(x)
    if self.kind == "none":
      return x
    raise ValueError(f"norm must be one of {NORMS}, got {self.kind!r}")


def pool(x: jax.Array, kind: str, window: int, stride: int, padding: int = 0) -> jax.Array:
  """Max or average pooling, honouring zero/neg-inf padding.

  Average pooling divides by the full window (``count_include_pad``), as
  PyTorch's default; max pooling pads with ``-inf``.
  """
  pads = ((padding, padding), (padding, padding))
  if kind == "max":
    if window == stride and not padding and x.shape[1] % window == 0 and x.shape[2] % window == 0:
      return tile_max_pool(x, window)
    return nn.max_pool(x, (window, window), (stride, stride), pads)
  if kind == "avg":
    return nn.avg_pool(x, (window, window), (stride, stride), pads,
                       count_include_pad=True)
  raise ValueError(f"pool kind must be 'max' or 'avg', got {kind!r}")


def _tiles(x: jax.Array, k: int) -> list[jax.Array]:
  """The ``k*k`` strided slices ``x[:, i::k, j::k]``, window positions in row-major order."""
  if x.ndim != 4 or k < 1 or x.shape[1] % k or x.shape[2] % k:
    raise ValueError(f"tile_max_pool needs (B, H, W, C) maps with H and W multiples of k={k}, "
                     f"got shape {tuple(x.shape)}")
  return [x[:, i::k, j::k, :] for i in range(k) for j in range(k)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def tile_max_pool(x: jax.Array, k: int) -> jax.Array:
  """Max pooling over non-overlapping ``k x k`` tiles (``H`` and ``W`` multiples of ``k``).

  The same function and gradient as ``nn.max_pool(x, (k, k), (k, k))``: the
  gradient goes to the first maximum of each window in row-major order, as
  XLA's select-and-scatter does.  Its VJP keeps only that index (``int8``, a
  sixteenth of ``x``'s bytes at ``k = 2``) and scatters with elementwise
  selects; XLA CPU's select-and-scatter ran 36x slower at 32x32x64, batch 32.
  """
  return functools.reduce(jnp.maximum, _tiles(x, k))


def _tile_max_pool_fwd(x: jax.Array, k: int):
  tiles = _tiles(x, k)
  y = functools.reduce(jnp.maximum, tiles)
  first = jnp.full(y.shape, len(tiles) - 1, jnp.int8)
  for t in reversed(range(len(tiles) - 1)):
    first = jnp.where(tiles[t] == y, jnp.int8(t), first)
  return y, first


def _tile_max_pool_bwd(k: int, first: jax.Array, dy: jax.Array):
  zero = jnp.zeros((), dy.dtype)
  rows = [jnp.stack([jnp.where(first == i * k + j, dy, zero) for j in range(k)], axis=3)
          for i in range(k)]  # each (B, Ho, Wo, k_j, C)
  dx = jnp.stack(rows, axis=2)  # (B, Ho, k_i, Wo, k_j, C)
  b, ho, _, wo, _, c = dx.shape
  return (dx.reshape(b, ho * k, wo * k, c),)


tile_max_pool.defvjp(_tile_max_pool_fwd, _tile_max_pool_bwd)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes: ``(B, H, W, C) -> (B, C)``."""
  return jnp.mean(x, axis=(1, 2))


def he_normal_fan_out() -> nn.initializers.Initializer:
  """He (Kaiming) normal initialiser with fan-out, as torchvision's conv init."""
  return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def num_channels(base: int, width: float) -> int:
  """Channels of a layer scaled by a width multiplier (at least 1)."""
  return max(1, int(math.floor(base * width + 0.5)))

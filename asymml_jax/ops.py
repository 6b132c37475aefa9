"""Trusted and untrusted halves of a convolution as pure functions.

Convolution is linear, so for ``X = X_L + R`` (DESIGN section 1):

    conv(X, W) = conv(X_L, W) + conv(R, W)

The untrusted accelerator computes ``conv(R, W)`` (:func:`untrusted_conv`);
the trusted side computes ``conv(X_L, W) = conv(P, W')`` with the folded
kernel ``W' = W x_C U`` of ``r`` input channels (:func:`fold_kernel`,
:func:`lowrank_conv`), about ``r / C`` of the dense cost, and adds the two and
the bias (:func:`combine`).  Kernels use Flax's HWIO layout, activations NHWC.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

Padding = tuple[tuple[int, int], tuple[int, int]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvSpec:
  """One convolution of a staged model.

  Attributes:
    name: unique name; its parameters live under ``params['convs'][name]``.
    site: the trusted activation (decomposition site) this conv reads.
    in_features: input channels ``C``.
    features: output channels ``Cout``.
    kernel_size: ``(kh, kw)``.
    strides: ``(sh, sw)``.
    padding: explicit ``((top, bottom), (left, right))`` zero padding.
    use_bias: whether a bias is added (in the trusted half).
  """

  name: str
  site: str
  in_features: int
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: Padding = ((1, 1), (1, 1))
  use_bias: bool = True

  def output_hw(self, h: int, w: int) -> tuple[int, int]:
    """Spatial size of the output for an ``h x w`` input."""
    (pt, pb), (pl, pr) = self.padding
    kh, kw = self.kernel_size
    sh, sw = self.strides
    return (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1

  def macs(self, h: int, w: int, in_channels: int | None = None) -> int:
    """Multiply-accumulates of the dense convolution on one sample."""
    ho, wo = self.output_hw(h, w)
    c = self.in_features if in_channels is None else in_channels
    return ho * wo * self.kernel_size[0] * self.kernel_size[1] * c * self.features


def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
         padding: Padding) -> jax.Array:
  """Plain NHWC x HWIO convolution without bias.

  When the kernel is larger than the input (3x3 on the 2x2 or 1x1 maps at the
  end of VGG/ResNet at 32x32), XLA's CPU convolution takes a path ~40x slower
  than the same product as im2col + matmul (0.55 s against 0.014 s for batch
  32, 512 channels, 2x2), so those convolutions run as :func:`im2col_conv`.
  """
  kh, kw = kernel.shape[:2]
  if x.shape[1] < kh or x.shape[2] < kw:
    return im2col_conv(x, kernel, strides, padding)
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)


def _patches(x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int],
             padding: Padding) -> jax.Array:
  """``(B, Ho, Wo, C*kh*kw)`` image patches, channel-major (im2col)."""
  return jax.lax.conv_general_dilated_patches(
      x, kernel_size, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)


def im2col_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                padding: Padding) -> jax.Array:
  """:func:`conv` as patches times the ``(C*kh*kw, Cout)`` kernel matrix."""
  kh, kw, c, cout = kernel.shape
  mat = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(c * kh * kw, cout)
  return jnp.einsum("bhwk,ko->bhwo", _patches(x, (kh, kw), strides, padding), mat,
                    precision=jax.lax.Precision.HIGHEST)


def untrusted_conv(r: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """The accelerator's half: ``Y_R = conv(R, W)`` (DESIGN section 3, step 2)."""
  return conv(r, kernel.astype(r.dtype), spec.strides, spec.padding)


def fold_kernel(kernel: jax.Array, u: jax.Array) -> jax.Array:
  """Folded kernel ``W' = W x_C U`` (DESIGN section 1).

  Args:
    kernel: ``(kh, kw, C, Cout)``.
    u: ``(C, r)`` shared or ``(B, C, r)`` per sample.

  Returns:
    ``(kh, kw, r, Cout)`` or ``(B, kh, kw, r, Cout)``.
  """
  if u.ndim == 3:
    return jnp.einsum("hwco,bcr->bhwro", kernel, u,
                      precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("hwco,cr->hwro", kernel, u,
                    precision=jax.lax.Precision.HIGHEST)


def shifted_patches(x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int],
                    padding: Padding) -> jax.Array:
  """``(B, Ho, Wo, kh*kw*C)`` image patches, tap-major, from strided slices.

  The same patches as :func:`_patches` up to the order of the last axis (here
  ``(i, j, c)``), built by padding once and concatenating the ``kh kw``
  shifted views: XLA CPU runs ``conv_general_dilated_patches`` as a
  convolution with a one-hot kernel, 2-3x slower at 224x224.
  """
  (pt, pb), (pl, pr) = padding
  kh, kw = kernel_size
  sh, sw = strides
  ho, wo = ConvSpec(name="", site="", in_features=1, features=1, kernel_size=kernel_size,
                    strides=strides, padding=padding).output_hw(x.shape[1], x.shape[2])
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  views = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
           for i in range(kh) for j in range(kw)]
  return views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)


# Per-sample low-rank convolutions of at most this batch and rank, on maps of
# at least this many pixels, run as one convolution per sample (faster than
# the batched matmul at 224x224, r = 4: 23 against 35 ms for a batch of 4 on
# one core; no faster on small maps, where the unrolled loop only adds
# compile time).
LOOP_MAX_BATCH = 8
LOOP_MAX_RANK = 8
LOOP_MIN_PIXELS = 112 * 112
# At most this rank, unit stride: the convolution as r kh kw fused
# multiply-adds of shifted views (one pass writing the output; 1.38 -> 0.22 ms
# at 32x32, r = 1, Cout = 16, batch 32 on one core).
FMA_MAX_RANK = 2


def per_sample_conv(x: jax.Array, kernels: jax.Array, strides: tuple[int, int],
                    padding: Padding) -> jax.Array:
  """``conv(x_b, K_b)`` for every sample ``b`` of ``x`` with its own kernel.

  Args:
    x: ``(B, H, W, r)``.
    kernels: ``(B, kh, kw, r, Cout)``.
    strides, padding: the convolution's geometry.

  Small batches of few channels on large maps run one convolution per
  sample; unit strides at rank ``<= FMA_MAX_RANK`` run as fused
  multiply-adds of shifted views; otherwise tap-major patches times a
  batched matrix.  (A vmapped convolution becomes a
  grouped convolution of ``r``-channel groups, which XLA's CPU kernels run at a
  fraction of their dense speed.)
  """
  b, r = x.shape[0], x.shape[-1]
  if b <= LOOP_MAX_BATCH and r <= LOOP_MAX_RANK and x.shape[1] * x.shape[2] >= LOOP_MIN_PIXELS:
    return jnp.concatenate([conv(x[i:i + 1], kernels[i], strides, padding)
                            for i in range(b)], axis=0)
  if r <= FMA_MAX_RANK and tuple(strides) == (1, 1):
    return _fma_conv(x, kernels, _pairs(padding))
  return _patch_conv(x, kernels, strides, padding)


def _pairs(padding: Padding) -> tuple[tuple[int, int], tuple[int, int]]:
  return tuple((int(a), int(b)) for a, b in padding)


def _patch_conv(x: jax.Array, kernels: jax.Array, strides: tuple[int, int],
                padding: Padding) -> jax.Array:
  """Per-sample conv as tap-major patches times a batched matrix."""
  b, r = x.shape[0], x.shape[-1]
  kh, kw = kernels.shape[1:3]
  mat = kernels.reshape(b, kh * kw * r, kernels.shape[-1])
  return jnp.einsum("bhwk,bko->bhwo", shifted_patches(x, (kh, kw), strides, padding),
                    mat, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fma_conv(x: jax.Array, kernels: jax.Array, padding) -> jax.Array:
  """Unit-stride per-sample conv of few input channels as fused multiply-adds.

  ``y_b = sum_{i,j,a} shift_{ij}(x_b)[..., a] K_b[i, j, a, :]``.  Its VJP keeps
  only ``x`` and ``K`` and is the patch form's: ``dK`` correlates ``x``'s
  shifted patches with ``dy``, ``dx`` adds ``dy K^T``'s taps back in place.
  """
  (pt, pb), (pl, pr) = padding
  kh, kw, r = kernels.shape[1:4]
  ho, wo = x.shape[1] + pt + pb - kh + 1, x.shape[2] + pl + pr - kw + 1
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  out = None
  for i in range(kh):
    for j in range(kw):
      for a in range(r):
        term = xp[:, i:i + ho, j:j + wo, a:a + 1] * kernels[:, None, None, i, j, a, :]
        out = term if out is None else out + term
  return out


def _fma_conv_fwd(x, kernels, padding):
  return _fma_conv(x, kernels, padding), (x, kernels)


def _fma_conv_bwd(padding, res, dy):
  x, kernels = res
  b, kh, kw, r, cout = kernels.shape
  mat = kernels.reshape(b, kh * kw * r, cout)
  patch_fn = lambda v: shifted_patches(v, (kh, kw), (1, 1), padding)  # linear in v
  patches, patch_vjp = jax.vjp(patch_fn, x)
  dpatches = jnp.einsum("bhwo,bko->bhwk", dy, mat, precision=jax.lax.Precision.HIGHEST)
  (dx,) = patch_vjp(dpatches.astype(x.dtype))  # the shifted views added back
  dk = jnp.einsum("bhwk,bhwo->bko", patches, dy, precision=jax.lax.Precision.HIGHEST)
  return dx, dk.reshape(kernels.shape).astype(kernels.dtype)


_fma_conv.defvjp(_fma_conv_fwd, _fma_conv_bwd)


def lowrank_conv(p: jax.Array, u: jax.Array, kernel: jax.Array,
                 spec: ConvSpec) -> jax.Array:
  """The trusted half: ``Y_L = conv(X_L, W) = conv(P, W')`` (section 3, step 3).

  Args:
    p: ``(B, H, W, r)`` principal-channel maps.
    u: ``(C, r)`` or ``(B, C, r)`` principal channels.
    kernel: ``(kh, kw, C, Cout)``.
    spec: the convolution's geometry.
  """
  folded = fold_kernel(kernel, u)
  if u.ndim == 2:
    return conv(p, folded, spec.strides, spec.padding)
  return per_sample_conv(p, folded, spec.strides, spec.padding)


def combine(y_lowrank: jax.Array | None, y_residual: jax.Array,
            bias: jax.Array | None) -> jax.Array:
  """``Y = Y_L + Y_R + b`` (DESIGN section 3, step 4)."""
  y = y_residual if y_lowrank is None else y_lowrank + y_residual
  return y if bias is None else y + bias

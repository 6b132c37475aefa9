"""Slalom: blinded, Freivalds-verified inference (Tramer and Boneh, ICLR 2019).

The inference baseline of issue 6 (DESIGN sections 5 and 8), on the same
staged models (``models/``) that AsymML splits.  Slalom keeps every non-linear
layer in the TEE and outsources **every linear layer** (each convolution and
the classifier's ``nn.Dense``) to the untrusted accelerator, over a prime field
``F_p`` (paper Section 3, Figure 1):

1. **Quantisation** (paper Section 3.1).  Activations ``x`` and weights ``W``
   are fixed-point numbers with ``k = bits`` fractional bits (default ``k = 8``,
   as the paper): ``x_q = round(2^k x)``, ``W_q = round(2^k W)``, embedded in
   ``F_p`` (negative values as ``p - |v|``).  A linear output
   ``y_q = W_q x_q`` has scale ``2^{2k}``; the TEE maps it back to the centred
   range ``(-p/2, p/2)``, dequantises ``y = 2^{-2k} y_q`` and adds the bias
   (the bias is never outsourced).  The default prime is the paper's
   ``p = 2^24 - 3`` (Section 4).

2. **Exact arithmetic on the accelerator.**  The accelerator computes
   ``conv(centre(x~), W_q)`` in **float64**, where ``centre`` maps a field
   element to ``(-p/2, p/2]``.  Every product and every partial sum is an
   integer of absolute value at most ``m * (p // 2) * max|W_q|`` (``m = kh kw
   C`` terms), which :meth:`SlalomRunner.load` checks to be ``< 2^52`` for
   each layer, so float64 (exact up to ``2^53``; the factor 2 is headroom for
   the division-free reduction :func:`_fmod`) represents every intermediate
   exactly, in any summation order (for ``p = 2^24 - 3`` and VGG16's largest
   ``m = 4608``: ``max|W_q| < 2^16.8``, i.e. ``|W| < 450`` at ``k = 8``).  The
   result is reduced mod ``p`` on the accelerator (exactly: :func:`_fmod`)
   and returned as int32.  The TEE's own field arithmetic stays exact
   too: field elements are ``< p < 2^26``, so products of two are ``< 2^52``
   and are reduced before any sum; contractions of two field elements use
   float64 on 13-bit limbs (``a = a_hi 2^13 + a_lo``), each partial sum at
   most ``n * 2^13 * (p // 2) < 2^52`` (checked per layer).

3. **Privacy: blinding with precomputed unblinding factors** (paper Section
   3.3).  For every linear-layer input ``x`` the TEE draws a one-time pad
   ``r`` uniform in ``F_p`` (64-bit words mod ``p``: statistical distance
   ``< p / 2^64``) from its own key -- the runner's ``i``-th batch uses
   ``fold_in(K, i)`` of the key ``K`` it was given, never a default key --
   and sends ``x~ = x_q + r mod p``, a uniformly random field element
   independent of ``x``.  The *unblinding factors* ``u = conv(r, W_q) mod p``
   are computed **offline** in the TEE (:meth:`SlalomRunner.precompute`,
   timed separately; the paper stores them sealed outside the enclave, here
   they stay in memory); online the TEE only computes ``x_q + r`` and
   ``y~ - u = conv(x_q, W_q) (mod p)``.  Linear layers that read the same
   activation (a ResNet block's ``conv1`` and its 1x1 shortcut) share one
   pad: the accelerator sees one blinded tensor.  Every pad is used for one
   batch only.

4. **Integrity: Freivalds' check** (paper Section 3.2).  For each result
   ``y~`` the TEE draws secret ``v in F_p^{t x Cout}`` and ``s in F_p^{t x B}``
   (``t = repetitions``; drawn offline with the pads, together with the folded
   kernel ``W_q v``) and checks, for every output position ``(h, w)`` and
   repetition ``j``,

       sum_b s_jb sum_o y~[b, h, w, o] v_jo == conv(sum_b s_jb x~_b, W_q v_j)[h, w]   (mod p)

   which costs one single-output-channel convolution instead of ``B * Cout``
   (the batch and the output channels are combined by ``s`` and ``v``).
   **Soundness:** if ``y~ != conv(x~, W_q)`` the error ``E`` is non-zero at
   some position; ``s^T E_hw v`` is then a non-zero polynomial of degree 2 in
   the uniform ``(s, v)``, which vanishes with probability at most
   ``2/p - 1/p^2`` (``Pr[E v = 0] <= 1/p``, then ``Pr[s^T (E v) = 0] = 1/p``;
   Schwartz-Zippel).  A wrong result passes ``t`` independent repetitions with
   probability at most ``(2/p)^t`` (``1.2e-7`` for one repetition at
   ``p = 2^24 - 3``; the textbook ``1/p`` is the single-vector check of one
   matrix product, ``B = 1`` without the batch combination).  A rejected
   result raises :class:`SlalomIntegrityError` naming the layer.  A correct
   result always passes: every quantity is computed exactly.

5. **Non-linear layers in the TEE**: the staged model's trusted stages
   (normalisation with running statistics, ReLU, pooling, residual additions,
   the global average pool) run unchanged in float32 on the dequantised
   outputs.  The loss/softmax of :meth:`SlalomBackend.evaluate` as well.

Ranges: a value ``v`` is only representable for ``|v| < p/2`` at its scale.
The TEE checks every quantised input (``|2^k x| < p/2``) and requires every
recovered output to satisfy ``|2^{2k} y| <= p/4``, half the representable
range: an output with ``p/4 < |2^{2k} y| < 3p/4`` either is recovered as it
is or wraps around ``p`` to a value beyond ``p/4``, and is refused in both
cases; only outputs beyond three times the accepted range could wrap into
it unnoticed.  Both checks raise :class:`SlalomRangeError` naming the layer.
At the defaults ``|y| <= 64`` and ``|x| < 32768``; use fewer bits or a
larger prime (``p < 2^26``) for wider ranges.

Timing (:attr:`SlalomRunner.last_timing`): ``trusted_s`` (TEE: quantise,
blind, unblind, verify, non-linear stages, head), ``untrusted_s`` (the
accelerator's linear layers on blinded integers, including the copies to and
from its device), ``precompute_s`` (the offline pads and factors consumed by
the call), ``verify_s`` (the part of ``trusted_s`` spent in Freivalds checks).

Supported models: ``vgg11``, ``vgg16``, ``resnet18``, ``resnet20`` (any
width, norm and input size); the shortcuts live in the trusted stages, so the
ResNets need nothing special.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asymml_jax import backends as bk
from asymml_jax import ops
from asymml_jax import stages as st
from asymml_jax.models.base import StagedModel
from asymml_jax.ops import ConvSpec

Tree = Any

SUPPORTED_MODELS: tuple[str, ...] = ("vgg11", "vgg16", "resnet18", "resnet20")
DEFAULT_PRIME = 2**24 - 3       # the paper's field (Section 4)
MAX_PRIME = 2**26               # products of two field elements stay < 2^52
# float64 represents every integer of |n| <= 2^53; every bound keeps a factor 2
# of headroom for the division-free reduction _fmod: intermediates < 2^52.
EXACT_BOUND = 2**52
LIMB_BITS = 13                  # field elements < 2^26 = two 13-bit limbs
HEAD = "head"                   # name (and site) of the classifier's linear layer


class SlalomIntegrityError(RuntimeError):
  """The accelerator's result for a linear layer failed verification.

  Attributes:
    layer: the linear layer (conv name, or ``"head"`` for the classifier).
    reason: ``"freivalds"`` (the check failed) or ``"malformed"`` (wrong
      shape or dtype).
  """

  def __init__(self, layer: str, reason: str, detail: str = ""):
    self.layer, self.reason = layer, reason
    msg = {"freivalds": f"layer {layer}: the accelerator's result failed Freivalds' check "
                        "(it is not conv(x~, W) mod p); the result is rejected",
           "malformed": f"layer {layer}: the accelerator returned a malformed result"}[reason]
    super().__init__(msg + (f" ({detail})" if detail else ""))


class SlalomRangeError(ArithmeticError):
  """A value does not fit the field at its fixed-point scale (see module docstring)."""


# ----------------------------------------------------------------------- config
def is_prime(n: int) -> bool:
  """Deterministic Miller-Rabin for ``n < 3.3e24`` (bases 2..41)."""
  if n < 2:
    return False
  small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
  for q in small:
    if n % q == 0:
      return n == q
  d, s = n - 1, 0
  while d % 2 == 0:
    d, s = d // 2, s + 1
  for a in small:
    x = pow(a, d, n)
    if x in (1, n - 1):
      continue
    for _ in range(s - 1):
      x = x * x % n
      if x == n - 1:
        break
    else:
      return False
  return True


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlalomConfig:
  """Validated Slalom settings (paper Sections 3.1-3.3; DESIGN section 11).

  Attributes:
    bits: fractional bits ``k`` of activations and weights (scale ``2^k``
      each, outputs ``2^{2k}``), in ``[1, 12]``.  Default 8, as the paper.
    prime: the field size ``p``, a prime with ``2^{2k+4} < p < 2^26``
      (outputs up to ``|y| <= p / 2^{2k+2}`` must be at least 4).  Default
      ``2^24 - 3``, as the paper.
    verify: run Freivalds' check on every accelerator result.
    repetitions: independent Freivalds repetitions ``t`` in ``[1, 8]``;
      soundness error ``<= (2/p)^t``.

  Raises:
    ValueError: naming the field, for a value outside its range.
  """

  bits: int = 8
  prime: int = DEFAULT_PRIME
  verify: bool = True
  repetitions: int = 1

  def __post_init__(self):
    if not _is_int(self.bits) or not 1 <= self.bits <= 12:
      raise ValueError(f"SlalomConfig.bits must be an integer in [1, 12], got {self.bits!r}")
    if not _is_int(self.prime) or not 2 < self.prime < MAX_PRIME or not is_prime(int(self.prime)):
      raise ValueError(f"SlalomConfig.prime must be a prime below 2^26, got {self.prime!r}")
    if self.prime <= 2 ** (2 * self.bits + 4):
      raise ValueError(
          f"SlalomConfig.prime {self.prime} is too small for bits={self.bits}: outputs at "
          f"scale 2^{2 * self.bits} need p > 2^{2 * self.bits + 4} (use fewer bits or a "
          "larger prime)")
    if not isinstance(self.verify, bool):
      raise ValueError(f"SlalomConfig.verify must be a bool, got {self.verify!r}")
    if not _is_int(self.repetitions) or not 1 <= self.repetitions <= 8:
      raise ValueError(
          f"SlalomConfig.repetitions must be an integer in [1, 8], got {self.repetitions!r}")

  @property
  def scale(self) -> int:
    """``2^k``: the fixed-point scale of activations and of weights."""
    return 2 ** self.bits

  @property
  def soundness_error(self) -> float:
    """Upper bound on a wrong result passing verification: ``(2/p)^t``."""
    return (2.0 / self.prime) ** self.repetitions

  @property
  def output_limit(self) -> float:
    """Largest accepted ``|y|`` of a linear output: ``(p // 4) / 2^{2k}``."""
    return (self.prime // 4) / 4.0 ** self.bits

  @property
  def input_limit(self) -> float:
    """Largest representable ``|x|`` of a linear input: ``(p // 2) / 2^k``."""
    return (self.prime // 2) / 2.0 ** self.bits


# ----------------------------------------------------------- field arithmetic
def centre(a: jax.Array, p) -> jax.Array:
  """Field elements ``[0, p)`` to their centred representatives ``(-p/2, p/2]``."""
  return jnp.where(a > p // 2, a - p, a)


def _fmod(a: jax.Array, p: jax.Array) -> jax.Array:
  """``a mod p`` in ``[0, p)`` for float64 integers ``|a| < 2^52``, without a division.

  ``q = floor(a / p)`` from the reciprocal is off by at most one (its relative
  error is ``~2^-52``), ``a - q p`` is then exact (``|q p| < 2^53``) and one
  correction each way makes it the remainder.  Several times faster than
  ``jnp.mod`` (``fmod``) on the CPU, which dominates Freivalds' check otherwise.
  """
  pf = p.astype(jnp.float64)
  r = a - jnp.floor(a * (1.0 / pf)) * pf
  r = jnp.where(r < 0, r + pf, r)
  return jnp.where(r >= pf, r - pf, r)


def _mod_int(a: jax.Array, p: jax.Array) -> jax.Array:
  """``a mod p`` as int32 in ``[0, p)`` for integer-valued ``|a| < 2^52`` (via :func:`_fmod`;
  an integer division by a traced ``p`` is scalar code on the CPU)."""
  return _fmod(a.astype(jnp.float64), p).astype(jnp.int32)


def _limbs(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``a = hi 2^13 + lo`` (integers ``0 <= a < 2^26``) as float64 arrays of values ``< 2^13``."""
  a = a.astype(jnp.float64)
  hi = jnp.floor(a * 2.0**-LIMB_BITS)
  return hi, a - hi * 2.0**LIMB_BITS


def _join(hi: jax.Array, lo: jax.Array, p: jax.Array) -> jax.Array:
  """``(hi 2^13 + lo) mod p`` of two exact float64 partial results (float64 in ``[0, p)``)."""
  return _fmod(_fmod(hi, p) * 2.0**LIMB_BITS + _fmod(lo, p), p)


def _tap_conv(x: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """``conv(x, kernel)`` for a kernel with few output channels (Freivalds' check).

  Contracts the channels once per tap (a matrix product with ``kh kw O``
  columns), then adds the ``kh kw`` shifted, strided planes: no ``im2col``
  buffer, which for one output channel would cost ``kh kw`` times the input.
  Every partial sum is a partial sum of the convolution's own terms, so the
  exactness bound of :func:`freivalds_check` holds unchanged.

  Args:
    x: ``(N, H, W, C)`` float64.
    kernel: ``(kh, kw, C, O)`` float64.
    spec: strides and padding.
  """
  kh, kw, _, _ = kernel.shape
  z = jnp.einsum("nhwc,ijco->nhwijo", x, kernel, precision=jax.lax.Precision.HIGHEST)
  (pt, pb), (pl, pr) = spec.padding
  z = jnp.pad(z, ((0, 0), (pt, pb), (pl, pr), (0, 0), (0, 0), (0, 0)))
  ho, wo = spec.output_hw(x.shape[1], x.shape[2])
  sh, sw = spec.strides
  out = 0.0
  for i in range(kh):
    for j in range(kw):
      out = out + z[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, i, j, :]
  return out


def _conv64(x: jax.Array, kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=spec.strides, padding=spec.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames="spec")
def field_linear(xt: jax.Array, wq: jax.Array, p: jax.Array, *, spec: ConvSpec) -> jax.Array:
  """``conv(x~, W_q) mod p``: the accelerator's work (and the TEE's offline ``u = conv(r, W_q)``).

  Exact in float64 when ``m (p // 2) max|W_q| < 2^52`` (checked by
  :meth:`SlalomRunner.load`); see the module docstring, point 2.

  Args:
    xt: ``(B, H, W, C)`` int32 field elements in ``[0, p)``.
    wq: ``(kh, kw, C, Cout)`` float64 integer weights ``round(2^k W)``.
    p: the prime (int32 scalar).
    spec: the layer's geometry.

  Returns:
    ``(B, Ho, Wo, Cout)`` int32 in ``[0, p)``.
  """
  y = _conv64(centre(xt, p).astype(jnp.float64), wq, spec)
  return _fmod(y, p).astype(jnp.int32)


@jax.jit
def fold_verifier(wq: jax.Array, v: jax.Array, p: jax.Array) -> jax.Array:
  """Freivalds' folded kernel ``V_j = W_q v_j mod p`` (offline, paper Section 3.2).

  Args:
    wq: ``(kh, kw, C, Cout)`` float64 integer weights.
    v: ``(t, Cout)`` int32 secret vectors in ``[0, p)``.
    p: the prime.

  Returns:
    ``(kh, kw, C, t)`` int32 in ``[0, p)``.
  """
  p64 = p.astype(jnp.int64)
  # |W_q| < p/2 (checked at load) times v < p: every product < p^2 / 2 < 2^51.
  prod = jnp.mod(wq.astype(jnp.int64)[..., None, :] * v.astype(jnp.int64), p64)
  return jnp.mod(jnp.sum(prod, axis=-1), p64).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="spec")
def freivalds_check(xt: jax.Array, yt: jax.Array, vkernel: jax.Array, v: jax.Array,
                    s: jax.Array, p: jax.Array, *, spec: ConvSpec) -> jax.Array:
  """Freivalds' check of ``y~ == conv(x~, W_q) (mod p)`` (paper Section 3.2).

  For each repetition ``j``: ``s_j^T (y~ v_j) == conv(s_j^T x~, V_j)`` at every
  output position, ``V_j = W_q v_j`` from :func:`fold_verifier`.  A wrong
  ``y~`` passes with probability ``<= (2/p)^t`` (module docstring, point 4).

  Exactness (float64, every intermediate an integer below ``2^52``): products
  of two field elements are ``< p^2 < 2^52`` and are reduced before summing
  ``B`` of them; contractions over ``Cout`` (``y~ v``) and over the ``m = kh kw
  C`` kernel terms (the folded convolution) split the field element into 13-bit
  limbs, each partial sum ``< n 2^13 (p // 2) < 2^52`` (checked per layer by
  :meth:`SlalomRunner.load`).

  Args:
    xt: ``(B, H, W, C)`` int32, the blinded input the TEE sent.
    yt: ``(B, Ho, Wo, Cout)`` int32, the accelerator's answer (reduced mod ``p`` here).
    vkernel: ``(kh, kw, C, t)`` int32.
    v: ``(t, Cout)`` int32.
    s: ``(t, B)`` int32.
    p: the prime.
    spec: the layer's geometry.

  Returns:
    A scalar bool: every repetition passed at every position.
  """
  hp = jax.lax.Precision.HIGHEST
  sf = s.astype(jnp.float64)
  # Left side: s_j^T (y~ v_j), (t, Ho, Wo).
  vc = centre(v, p).astype(jnp.float64)
  hi, lo = _limbs(_mod_int(yt, p))
  z = _join(jnp.einsum("bhwo,jo->jbhw", hi, vc, precision=hp),
            jnp.einsum("bhwo,jo->jbhw", lo, vc, precision=hp), p)          # (t, B, Ho, Wo)
  left = _fmod(jnp.sum(_fmod(sf[:, :, None, None] * z, p), axis=1), p)
  # Right side: conv(s_j^T x~, V_j), (t, Ho, Wo).
  xs = _fmod(jnp.sum(_fmod(sf[:, :, None, None, None] * xt.astype(jnp.float64)[None], p),
                     axis=1), p)                                            # (t, H, W, C)
  kc = jnp.transpose(centre(vkernel, p).astype(jnp.float64), (3, 0, 1, 2))[..., None]
  one = lambda x, k: _tap_conv(x[None], k, spec)[0, ..., 0]
  hi, lo = _limbs(xs)
  right = _join(jax.vmap(one)(hi, kc), jax.vmap(one)(lo, kc), p)
  return jnp.all(left == right)


# ------------------------------------------------------------ model structure
_LINEAR_MODULES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, nn.ConvLocal,
                   nn.Einsum)


@dataclasses.dataclass(frozen=True)
class _Program:
  """The static Slalom view of a staged model (built once per model).

  Attributes:
    linears: every outsourced linear layer, in execution order, as conv specs;
      the head is a 1x1 convolution on the ``(B, 1, 1, C)`` pooled features.
    head_path: module path of the head ``nn.Dense`` inside the last stage.
    consumers: per stage ``k``, the linear layers reading its outputs.
    sites: per stage ``k``, the sites (linear inputs) it produces, in order.
    site_shapes: ``(H, W, C)`` of every site.
  """

  linears: tuple[ConvSpec, ...]
  head_path: tuple[str, ...]
  consumers: tuple[tuple[ConvSpec, ...], ...]
  sites: tuple[tuple[str, ...], ...]
  site_shapes: Mapping[str, tuple[int, int, int]]


def _head_interceptor(model_name: str, record: dict, capture: bool):
  """Intercepts linear modules: captures the head ``nn.Dense`` input, refuses others."""
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, _LINEAR_MODULES):
      return next_fun(*args, **kwargs)
    if not capture or type(module) is not nn.Dense or "x" in record:
      raise ValueError(
          f"{model_name}: a trusted stage contains the linear layer {type(module).__name__} "
          f"{module.name!r}; Slalom outsources linear layers and supports only the "
          f"classifier nn.Dense of the last stage (supported models: "
          f"{', '.join(SUPPORTED_MODELS)})")
    x = args[0]
    if x.ndim != 2:
      raise ValueError(f"{model_name}: the classifier nn.Dense must read (B, C) features, "
                       f"got shape {x.shape}")
    record["x"], record["path"] = x, tuple(module.scope.path)
    record["features"] = int(module.features)
    out = jnp.zeros((*x.shape[:-1], module.features), x.dtype)
    record["placeholder"] = out
    return out
  return interceptor


def _apply_stage(model: StagedModel, k: int, variables: Mapping, ys: Mapping, carry: Mapping,
                 record: dict | None = None):
  """Runs trusted stage ``k`` in inference mode; the last one stops at the head's input.

  Returns ``(xs, carry)`` with, for the last stage, ``xs = {"head": (B, 1, 1, C)}``.
  """
  last = k == model.num_stages - 1
  record = {} if record is None else record
  with nn.intercept_methods(_head_interceptor(model.name, record, last)):
    xs, carry = model.stages[k].apply(dict(variables), ys, carry, False)
  if not last:
    return xs, carry
  if "x" not in record:
    raise ValueError(f"{model.name}: the last stage has no classifier nn.Dense to outsource")
  if xs.get("logits") is not record["placeholder"]:
    raise ValueError(f"{model.name}: Slalom needs the logits to be the output of the "
                     "last stage's nn.Dense itself (no operation after it)")
  return {HEAD: record["x"][:, None, None, :]}, {}


@functools.lru_cache(maxsize=16)
def _program(model: StagedModel) -> _Program:
  """Abstract pass over ``model`` (no FLOPs): linear layers, sites, the head."""
  if model.name not in SUPPORTED_MODELS:
    raise ValueError(f"Slalom supports the models {', '.join(SUPPORTED_MODELS)}; "
                     f"got {model.name!r}")
  if HEAD in model.convs or HEAD in model.site_shapes:
    raise ValueError(f"{model.name}: a convolution or site is named {HEAD!r}, which is "
                     "reserved for the classifier")
  variables = jax.eval_shape(model.init, jax.random.key(0))
  shapes = dict(model.site_shapes)
  record: dict = {}

  def run(variables):
    carry: Any = {"image": jnp.zeros((1, *model.input_shape), jnp.float32)}
    ys: dict = {}
    for k in range(model.num_stages):
      xs, carry = _apply_stage(model, k, _stage_variables(variables, k), ys, carry, record)
      if k < model.num_stages - 1 and set(xs) != {c.site for c in model.groups[k]}:
        raise ValueError(f"{model.name}: stage {k} produces sites {sorted(xs)} but group {k} "
                         f"reads {sorted({c.site for c in model.groups[k]})}")
      if k < model.num_stages - 1:
        ys = {}
        for c in model.groups[k]:
          ho, wo = c.output_hw(*shapes[c.site][:2])
          ys[c.name] = jnp.zeros((1, ho, wo, c.features), jnp.float32)
    return xs[HEAD]

  feats = jax.eval_shape(run, variables)
  cin = int(feats.shape[-1])
  head = ConvSpec(name=HEAD, site=HEAD, in_features=cin, features=record["features"],
                  kernel_size=(1, 1), strides=(1, 1), padding=((0, 0), (0, 0)), use_bias=True)
  consumers, sites = [], []
  for k in range(model.num_stages):
    group = tuple(model.groups[k]) if k < model.num_stages - 1 else (head,)
    consumers.append(group)
    order: list[str] = []
    for c in group:
      if c.site not in order:
        order.append(c.site)
    sites.append(tuple(order))
  shapes[HEAD] = (1, 1, cin)
  return _Program(linears=(*model.convs.values(), head), head_path=record["path"],
                  consumers=tuple(consumers), sites=tuple(sites), site_shapes=shapes)


def _stage_variables(variables: Mapping, k: int) -> dict:
  out = {"params": variables["params"]["stages"][str(k)]}
  stats = variables.get("batch_stats", {}).get("stages", {}).get(str(k), {})
  if stats:
    out["batch_stats"] = stats
  return out


def _get_path(tree: Mapping, path: tuple[str, ...]) -> Mapping:
  for name in path:
    tree = tree[name]
  return tree


# ------------------------------------------------------------ trusted programs
@functools.partial(jax.jit, static_argnames=("model", "k"))
def _tee_stage(yts: Mapping, us: Mapping, biases: Mapping, stage_vars: Mapping,
               carry: Mapping, rs: Mapping, p: jax.Array, scale: jax.Array, *,
               model: StagedModel, k: int):
  """TEE, online, stage ``k``: unblind + dequantise group ``k-1``, stage ``k``, quantise + blind.

  Returns:
    ``(xts, carry, ymax, xmax)``: blinded inputs ``x~ = x_q + r mod p`` of the
    sites stage ``k`` produces, the private carry (shortcuts), and the largest
    ``|y_q|`` of each unblinded output and ``|x_q|`` of each quantised input
    (range checks, on the host).
  """
  ys, ymax = {}, []
  inv_out = 1.0 / (scale * scale)
  if k > 0:
    for c in model.groups[k - 1]:
      yq = centre(_mod_int(yts[c.name].astype(jnp.float64) - us[c.name], p), p)  # W_q x_q
      ymax.append(jnp.max(jnp.abs(yq)))
      y = yq.astype(jnp.float32) * inv_out
      ys[c.name] = y if c.name not in biases else y + biases[c.name]
  xs, carry = _apply_stage(model, k, stage_vars, ys, carry)
  xts, xmax = {}, []
  half = p // 2
  for site in _program(model).sites[k]:
    xq = jnp.round(xs[site].astype(jnp.float32) * scale)
    xmax.append(jnp.max(jnp.abs(xq)))
    xq = jnp.clip(xq, -half, half).astype(jnp.int32)
    xts[site] = _mod_int(xq + rs[site], p)
  as_vec = lambda v, dt: jnp.stack(v).astype(dt) if v else jnp.zeros((0,), dt)
  return xts, carry, as_vec(ymax, jnp.int32), as_vec(xmax, jnp.float32)


@jax.jit
def _tee_head(yt: jax.Array, u: jax.Array, bias: jax.Array, p: jax.Array, scale: jax.Array):
  """TEE, online: unblind + dequantise the classifier output and add its bias."""
  yq = centre(_mod_int(yt.astype(jnp.float64) - u, p), p)
  logits = yq[:, 0, 0, :].astype(jnp.float32) / (scale * scale) + bias
  return logits, jnp.max(jnp.abs(yq))


@functools.partial(jax.jit, static_argnames="model")
def reference_forward(variables: Mapping, images: jax.Array, *,
                      model: StagedModel) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Dense float32 inference (eval mode): what Slalom approximates.

  Returns:
    ``(logits, inputs)``: the logits and the input of every linear layer by
    site (``"head"``: the pooled features, ``(B, 1, 1, C)``), e.g. for
    quantisation-error estimates.
  """
  prog = _program(model)
  carry: Any = {"image": images}
  ys: dict = {}
  inputs: dict = {}
  for k in range(model.num_stages):
    xs, carry = _apply_stage(model, k, _stage_variables(variables, k), ys, carry)
    inputs.update(xs)
    ys = {}
    for c in prog.consumers[k]:
      if c.name == HEAD:
        p = _get_path(variables["params"]["stages"][str(k)], prog.head_path)
        kernel = p["kernel"][None, None]
      else:
        p = variables["params"]["convs"][c.name]
        kernel = p["kernel"]
      ys[c.name] = ops.combine(None, ops.conv(xs[c.site], kernel, c.strides, c.padding),
                               p.get("bias"))
  return ys[HEAD][:, 0, 0, :], inputs


def reference_logits(variables: Mapping, images: jax.Array, *, model: StagedModel) -> jax.Array:
  """Dense float32 logits (eval mode) of ``model``: what Slalom approximates."""
  return reference_forward(variables, images, model=model)[0]


@functools.partial(jax.jit, static_argnames=("model", "batch_size", "repetitions"))
def _offline(key: jax.Array, wq: Mapping[str, jax.Array], p: jax.Array, *,
             model: StagedModel, batch_size: int, repetitions: int):
  """TEE, offline: one batch's pads, unblinding factors and verifier (paper Section 3.3).

  All the batch's randomness is one stream of 64-bit words from ``key``
  (``jax.random.bits``; one PRNG instance keeps compilation short), reduced
  mod ``p`` (statistical distance from uniform ``< p / 2^64``) and cut, in a
  fixed order, into the pads of the sites (sorted by name), then per linear
  layer Freivalds' ``v`` and ``s``.

  Returns:
    ``(r, u, verifier)``: pads ``r[site]``, ``u[layer] = conv(r, W_q) mod p`` and
    ``verifier[layer] = (W_q v, v, s)`` (empty when ``repetitions == 0``).
  """
  prog = _program(model)
  shapes = [(batch_size, *shape) for _, shape in sorted(prog.site_shapes.items())]
  if repetitions:
    for spec in prog.linears:
      shapes += [(repetitions, spec.features), (repetitions, batch_size)]
  sizes = [math.prod(s) for s in shapes]
  words = jax.random.bits(key, (sum(sizes),), jnp.uint64) % p.astype(jnp.uint64)
  offsets = np.cumsum([0, *sizes])
  draws = iter(words[o:o + n].astype(jnp.int32).reshape(s)
               for o, n, s in zip(offsets, sizes, shapes))
  r = {site: next(draws) for site, _ in sorted(prog.site_shapes.items())}
  u, verifier = {}, {}
  for spec in prog.linears:
    u[spec.name] = field_linear(r[spec.site], wq[spec.name], p, spec=spec)
    if repetitions:
      v, s = next(draws), next(draws)
      verifier[spec.name] = (fold_verifier(wq[spec.name], v, p), v, s)
  return r, u, verifier


# ----------------------------------------------------------------------- runner
@dataclasses.dataclass
class _Pads:
  """One batch's offline material (used once): pads, unblinding factors, verifier."""

  batch_size: int
  r: dict          # site -> (B, H, W, C) int32
  u: dict          # linear -> (B, Ho, Wo, Cout) int32
  verifier: dict   # linear -> (vkernel, v, s)
  seconds: float


def _x64(fn):
  """Runs ``fn`` with 64-bit types enabled (float64/int64 field arithmetic)."""
  @functools.wraps(fn)
  def call(*args, **kwargs):
    with jax.enable_x64(True):
      return fn(*args, **kwargs)
  return call


def _default_device() -> jax.Device:
  """Where the untrusted program of every backend runs: JAX's default device."""
  device = jax.config.jax_default_device
  if isinstance(device, jax.Device):
    return device
  return jax.devices(device)[0] if isinstance(device, str) else jax.devices()[0]


def _check_key(key) -> jax.Array:
  if key is None or isinstance(key, (int, np.integer)):
    raise TypeError("SlalomRunner needs an explicit JAX PRNG key (jax.random.key(seed)); "
                    f"got {key!r}")
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != (2,) or key.dtype != jnp.uint32:
      raise TypeError(f"not a JAX PRNG key: dtype {key.dtype}, shape {key.shape}")
    key = jax.random.wrap_key_data(key)
  return key


class SlalomRunner:
  """Slalom inference of one staged model (paper Figure 1; module docstring).

  Usage::

      runner = SlalomRunner(model, variables, SlalomConfig(), jax.random.key(1))
      runner.precompute(batch_size=8)        # offline, in the TEE
      logits = runner.infer(images)          # online; runner.last_timing
      runner.macs(8)                         # trusted / untrusted MAC counts

  Args:
    model: a staged model (:data:`SUPPORTED_MODELS`).
    variables: ``{'params': ..., 'batch_stats': ...}`` as ``model.init`` makes.
    config: the :class:`SlalomConfig`.
    key: the TEE's PRNG key; the ``i``-th precomputed batch uses ``fold_in(key, i)``.
    untrusted_device: the accelerator's JAX device (default: JAX's default
      device, as the other backends' untrusted programs); the TEE always runs
      on the CPU.

  Raises:
    ValueError: an unsupported model.
    SlalomRangeError: weights too large for exact float64 sums at this
      ``(bits, prime)``.
  """

  def __init__(self, model: StagedModel, variables: Mapping, config: SlalomConfig,
               key: jax.Array, *, untrusted_device: jax.Device | None = None):
    if not isinstance(config, SlalomConfig):
      raise TypeError(f"config must be a SlalomConfig, got {type(config).__name__}")
    self.model, self.config = model, config
    self._key = _check_key(key)
    self.program = _program(model)
    self._cpu = jax.devices("cpu")[0]
    self._dev = untrusted_device if untrusted_device is not None else _default_device()
    self._pads: list[_Pads] = []
    self._batches = 0
    self.last_timing: dict[str, Any] = {}
    self.totals = {"trusted_s": 0.0, "untrusted_s": 0.0, "precompute_s": 0.0,
                   "verify_s": 0.0, "calls": 0}
    self.load(variables)

  # ------------------------------------------------------------------ weights
  @_x64
  def load(self, variables: Mapping) -> None:
    """Quantises the weights (``W_q = round(2^k W)``) and checks exactness bounds.

    Drops any precomputed pads: their unblinding factors depend on the weights.
    """
    cfg, p = self.config, self.config.prime
    convs = variables["params"]["convs"]
    head = _get_path(variables["params"]["stages"][str(self.model.num_stages - 1)],
                     self.program.head_path)
    kernels, biases = {}, {}
    for spec in self.program.linears:
      if spec.name == HEAD:
        w, b = np.asarray(head["kernel"], np.float64)[None, None], head.get("bias")
      else:
        w, b = np.asarray(convs[spec.name]["kernel"], np.float64), convs[spec.name].get("bias")
      wq = np.round(w * cfg.scale)
      wmax = float(np.max(np.abs(wq))) if wq.size else 0.0
      m = spec.kernel_size[0] * spec.kernel_size[1] * spec.in_features
      if not np.isfinite(wmax) or wmax >= p // 2:
        raise SlalomRangeError(f"layer {spec.name}: quantised weights reach {wmax:g}, beyond "
                               f"p/2 = {p // 2} (bits={cfg.bits})")
      if m * (p // 2) * wmax >= EXACT_BOUND:
        raise SlalomRangeError(
            f"layer {spec.name}: m * (p//2) * max|W_q| = {m} * {p // 2} * {wmax:g} >= 2^52, "
            "so the accelerator's float64 sums would not be exact; use fewer bits or a "
            "smaller prime")
      if max(m, spec.features) * 2**LIMB_BITS * (p // 2) >= EXACT_BOUND:
        raise SlalomRangeError(
            f"layer {spec.name}: {max(m, spec.features)} terms are too many for exact "
            "verification at this prime (n 2^13 (p//2) >= 2^52); use a smaller prime")
      kernels[spec.name] = wq
      if b is not None:
        biases[spec.name] = jax.device_put(np.asarray(b, np.float32), self._cpu)
    self._wq_tee = {n: jax.device_put(w, self._cpu) for n, w in kernels.items()}
    self._wq_acc = {n: jax.device_put(w, self._dev) for n, w in kernels.items()}
    self._biases = biases
    self._stage_vars = [jax.device_put(jax.tree.map(np.asarray, _stage_variables(variables, k)),
                                       self._cpu)
                        for k in range(self.model.num_stages)]
    self._p_tee = jax.device_put(np.int32(p), self._cpu)
    self._p_acc = jax.device_put(np.int32(p), self._dev)
    self._scale = jax.device_put(np.float32(cfg.scale), self._cpu)
    self._pads.clear()

  # --------------------------------------------------------------- precompute
  @_x64
  def precompute(self, batch_size: int, count: int = 1) -> float:
    """Offline phase in the TEE (paper Section 3.3): pads, unblinding factors, verifier.

    For ``count`` future batches of ``batch_size`` images: draws the one-time
    pads ``r`` of every site, computes ``u = conv(r, W_q) mod p`` for every
    linear layer, and (``verify``) Freivalds' secret vectors and folded kernels.

    Returns:
      The seconds spent (also stored with the pads and reported as the
      ``precompute_s`` of the call that consumes them).
    """
    if not _is_int(batch_size) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    total = 0.0
    for _ in range(int(count)):
      t0 = time.perf_counter()
      key = jax.random.fold_in(self._key, self._batches)
      self._batches += 1
      r, u, verifier = jax.block_until_ready(_offline(
          key, self._wq_tee, self._p_tee, model=self.model, batch_size=int(batch_size),
          repetitions=self.config.repetitions if self.config.verify else 0))
      dt = time.perf_counter() - t0
      self._pads.append(_Pads(int(batch_size), r, u, verifier, dt))
      total += dt
    return total

  def pending(self, batch_size: int) -> int:
    """Unused precomputed pad sets for ``batch_size``."""
    return sum(1 for pd in self._pads if pd.batch_size == batch_size)

  def _take_pads(self, batch_size: int) -> _Pads:
    for i, pd in enumerate(self._pads):
      if pd.batch_size == batch_size:
        return self._pads.pop(i)
    self.precompute(batch_size)
    return self._pads.pop()

  # -------------------------------------------------------------------- infer
  @_x64
  def infer(self, images: Any, *,
            accelerator_hook: Callable[[str, np.ndarray, np.ndarray], Any] | None = None
            ) -> jax.Array:
    """Online Slalom inference of one batch (paper Figure 1); returns float32 logits.

    Args:
      images: ``(B, H, W, C)`` (normalised as for the dense model).
      accelerator_hook: ``hook(layer, x~, y~) -> y~'`` sees what the
        accelerator sees (the blinded input) and may replace its answer
        (tests and attack experiments: a tampering accelerator).

    Raises:
      SlalomIntegrityError: a result failed Freivalds' check or is malformed.
      SlalomRangeError: a value outside the field's range at its scale.
    """
    self.model.check_input(images)
    cfg, prog, model = self.config, self.program, self.model
    images = jax.device_put(np.asarray(images, np.float32), self._cpu)
    batch = int(images.shape[0])
    pads = self._take_pads(batch)  # used once, whatever happens below
    trusted = untrusted = verify_s = 0.0
    layers: dict[str, dict[str, float]] = {}
    p = self._p_tee
    carry: Any = {"image": images}
    yts: dict[str, jax.Array] = {}
    for k in range(model.num_stages):
      prev = model.groups[k - 1] if k > 0 else ()
      t0 = time.perf_counter()
      xts, carry, ymax, xmax = jax.block_until_ready(_tee_stage(
          {c.name: yts[c.name] for c in prev}, {c.name: pads.u[c.name] for c in prev},
          {c.name: self._biases[c.name] for c in prev if c.name in self._biases},
          self._stage_vars[k], carry, {s: pads.r[s] for s in prog.sites[k]}, p,
          self._scale, model=model, k=k))
      trusted += time.perf_counter() - t0
      self._check_outputs([c.name for c in prev], np.asarray(ymax))
      self._check_inputs(prog.sites[k], np.asarray(xmax))
      for spec in prog.consumers[k]:
        xt = xts[spec.site]
        t0 = time.perf_counter()
        yt = field_linear(jax.device_put(xt, self._dev), self._wq_acc[spec.name], self._p_acc,
                          spec=spec)
        yt = jax.block_until_ready(jax.device_put(yt, self._cpu))
        dt_u = time.perf_counter() - t0
        untrusted += dt_u
        if accelerator_hook is not None:
          yt = accelerator_hook(spec.name, np.asarray(xt), np.asarray(yt))
        yt = self._validate(spec, batch, yt)
        dt_v = 0.0
        if cfg.verify:
          vk, v, s = pads.verifier[spec.name]
          t0 = time.perf_counter()
          ok = bool(freivalds_check(xt, yt, vk, v, s, p, spec=spec))
          dt_v = time.perf_counter() - t0
          if not ok:
            self._record(trusted + dt_v, untrusted, verify_s + dt_v, pads, layers, failed=True)
            raise SlalomIntegrityError(spec.name, "freivalds")
        trusted += dt_v
        verify_s += dt_v
        layers[spec.name] = {"untrusted_s": dt_u, "verify_s": dt_v}
        yts[spec.name] = yt
    t0 = time.perf_counter()
    logits, ymax = jax.block_until_ready(_tee_head(
        yts[HEAD], pads.u[HEAD], self._biases[HEAD], p, self._scale))
    trusted += time.perf_counter() - t0
    self._check_outputs([HEAD], np.asarray(ymax)[None])
    self._record(trusted, untrusted, verify_s, pads, layers)
    return jax.device_put(np.asarray(logits, np.float32))

  def _validate(self, spec: ConvSpec, batch: int, yt: Any) -> jax.Array:
    shape = (batch, *spec.output_hw(*self.program.site_shapes[spec.site][:2]), spec.features)
    if tuple(np.shape(yt)) != shape:
      raise SlalomIntegrityError(spec.name, "malformed",
                                 f"shape {tuple(np.shape(yt))}, expected {shape}")
    dtype = np.asarray(yt).dtype if not isinstance(yt, jax.Array) else yt.dtype
    if dtype != np.int32:
      raise SlalomIntegrityError(spec.name, "malformed", f"dtype {dtype}, expected int32")
    return jax.device_put(yt, self._cpu)

  def _check_outputs(self, names, ymax: np.ndarray) -> None:
    limit = self.config.prime // 4
    for name, v in zip(names, ymax):
      if not v <= limit:
        raise SlalomRangeError(
            f"layer {name}: an output reaches |2^{2 * self.config.bits} y| = {int(v)} > p/4 = "
            f"{limit} (|y| > {self.config.output_limit:g}); values beyond p/2 wrap around "
            "undetectably, so the result is refused: use fewer bits or a larger prime")

  def _check_inputs(self, sites, xmax: np.ndarray) -> None:
    limit = self.config.prime // 2
    for site, v in zip(sites, xmax):
      if not v < limit:
        raise SlalomRangeError(
            f"site {site}: an input reaches |2^{self.config.bits} x| = {v:g} >= p/2 = {limit} "
            f"(|x| >= {self.config.input_limit:g}): not representable in F_p; use fewer "
            "bits or a larger prime")

  def _record(self, trusted, untrusted, verify_s, pads, layers, failed=False) -> None:
    self.last_timing = {"trusted_s": trusted, "untrusted_s": untrusted,
                        "precompute_s": pads.seconds, "verify_s": verify_s,
                        "batch_size": pads.batch_size, "layers": layers, "rejected": failed}
    for k in ("trusted_s", "untrusted_s", "verify_s"):
      self.totals[k] += self.last_timing[k]
    self.totals["precompute_s"] += pads.seconds
    self.totals["calls"] += 1

  # --------------------------------------------------------------------- cost
  def macs(self, batch_size: int) -> dict[str, int]:
    """:func:`slalom_macs` of this runner's model and config."""
    return slalom_macs(self.model, batch_size, self.config)


def slalom_macs(model: StagedModel, batch_size: int,
                config: SlalomConfig = SlalomConfig()) -> dict[str, int]:
  """Multiply-accumulates of one Slalom batch (linear layers; non-linear stages excluded).

  Needs no weights (an abstract pass over ``model``).

  Returns:
    ``untrusted``: the accelerator's ``B sum_l macs_l``;
    ``trusted_online``: Freivalds' checks, ``t (Ho Wo kh kw C + B Ho Wo Cout
    + B H W C)`` per layer (field MACs; each is two float64 limb MACs here);
    ``trusted_offline``: ``u = conv(r, W)`` (``B sum_l macs_l``) and the folded
    kernels (``t kh kw C Cout`` per layer);
    ``tee_only``: the linear layers run whole in the TEE, ``B sum_l macs_l``;
    ``blinding_ops``: online element-wise blind/unblind additions.
  """
  prog = _program(model)
  b, t, verify = int(batch_size), config.repetitions, config.verify
  out = dict(untrusted=0, trusted_online=0, trusted_offline=0, tee_only=0, blinding_ops=0)
  blinded_sites = set()
  for spec in prog.linears:
    h, w, c = prog.site_shapes[spec.site]
    ho, wo = spec.output_hw(h, w)
    dense = b * spec.macs(h, w)
    kk = spec.kernel_size[0] * spec.kernel_size[1]
    out["untrusted"] += dense
    out["tee_only"] += dense
    out["trusted_offline"] += dense + (t * kk * c * spec.features if verify else 0)
    if verify:
      out["trusted_online"] += t * (ho * wo * kk * c + b * ho * wo * spec.features
                                    + b * h * w * c)
    out["blinding_ops"] += b * ho * wo * spec.features
    if spec.site not in blinded_sites:
      blinded_sites.add(spec.site)
      out["blinding_ops"] += b * h * w * c
  return out


# ---------------------------------------------------------------------- backend
@jax.jit
def _metrics(logits, labels, mask):
  return st.classification_loss(logits, labels, mask)[1]


class SlalomBackend(bk.Backend):
  """``slalom``: inference-only backend (:class:`asymml_jax.backends.Backend`).

  ``evaluate`` runs :class:`SlalomRunner` on the batch and returns the same
  metrics as every backend (``loss_sum``, ``correct``, ``count``); the runner
  is rebuilt when other weights are passed.  Pads are precomputed on demand
  unless :meth:`precompute` was called first; :attr:`timing` accumulates the
  trusted / untrusted / precompute seconds and :attr:`last_timing` has the
  latest call's split.

  Args:
    model, plan, key: as every backend factory (``plan`` is unused: Slalom
      outsources every linear layer).
    config: a :class:`SlalomConfig` (default: the paper's settings).
    untrusted_device: ``"cpu"``/``"gpu"``/``"tpu"`` or a ``jax.Device`` for
      the accelerator's linear layers (default: JAX's default device, e.g.
      inside ``jax.default_device(...)``).
  """

  name = "slalom"

  def __init__(self, model: StagedModel, plan, key: jax.Array, *,
               config: SlalomConfig | None = None,
               untrusted_device: str | jax.Device | None = None):
    self.model, self.plan = model, plan
    self.config = SlalomConfig() if config is None else config
    self._key = _check_key(key)
    if isinstance(untrusted_device, str):
      untrusted_device = bk.untrusted_device(untrusted_device)
    self._device = untrusted_device
    _program(model)  # validates the model now
    self.runner: SlalomRunner | None = None
    self._weights: tuple = ()
    self._loads = 0
    self._precompute_sizes: list[tuple[int, int]] = []

  def grads(self, params, stats, batch, step):
    raise NotImplementedError(
        "Slalom is inference-only: it outsources linear layers of a fixed, quantised "
        "model (training is out of its scope); use the dense, inline, local or enclave "
        "backend to train")

  def _runner_for(self, params, stats) -> SlalomRunner:
    leaves = tuple(jax.tree.leaves((params, stats)))
    if self.runner is not None and len(leaves) == len(self._weights) and all(
        a is b for a, b in zip(leaves, self._weights)):
      return self.runner
    variables = {"params": params, "batch_stats": stats}
    if self.runner is None:
      self.runner = SlalomRunner(self.model, variables, self.config,
                                 jax.random.fold_in(self._key, self._loads),
                                 untrusted_device=self._device)
    else:
      self.runner.load(variables)
    self._loads += 1
    self._weights = leaves
    for size, count in self._precompute_sizes:
      self.runner.precompute(size, count)
    self._precompute_sizes = []
    return self.runner

  def precompute(self, params, stats, batch_size: int, count: int = 1) -> float:
    """Offline phase for ``count`` batches of ``batch_size`` with these weights."""
    return self._runner_for(params, stats).precompute(batch_size, count)

  def evaluate(self, params, stats, batch, index):
    del index
    if batch is None:
      raise ValueError("the slalom backend needs the batch (it has no data of its own)")
    self.model.check_input(batch["image"])
    runner = self._runner_for(params, stats)
    logits = runner.infer(batch["image"])
    return _metrics(logits, jnp.asarray(batch["label"], jnp.int32),
                    jnp.asarray(batch["mask"], jnp.float32))

  @property
  def timing(self) -> dict[str, float]:
    """Cumulative ``trusted_s``, ``untrusted_s``, ``precompute_s``, ``verify_s``, ``calls``."""
    if self.runner is None:
      return {"trusted_s": 0.0, "untrusted_s": 0.0, "precompute_s": 0.0, "verify_s": 0.0,
              "calls": 0}
    return dict(self.runner.totals)

  @property
  def last_timing(self) -> dict[str, Any]:
    return {} if self.runner is None else dict(self.runner.last_timing)

  def close(self) -> None:
    if self.runner is not None:
      self.runner._pads.clear()


def _factory(model, plan, key, **options):
  known = {"config", "untrusted_device"}
  extra = sorted(set(options) - known)
  if extra:
    raise TypeError(f"slalom backend: unknown options {extra}; known: {sorted(known)}")
  return SlalomBackend(model, plan, key, **options)


bk.register_backend("slalom", _factory)

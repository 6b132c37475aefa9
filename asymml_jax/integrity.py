"""Integrity of the accelerator's convolutions: a Freivalds check (DESIGN section 6).

The TEE sends ``R`` out and receives ``Y = conv(R, W)`` (forward) and
``G = conv^T(dY, W)`` (backward, the residual gradient).  Recomputing either
would cost what the split saves; instead the TEE checks a random projection of
the result, as Freivalds checks a matrix product.  Convolution is linear in
the batch and in both channel axes, so with random signs ``a`` over the batch
and ``c`` over the output channels

    sum_{b,o} a_b c_o Y[b, p, o] = conv(sum_b a_b R_b, W c)[p]       (every pixel p)

where ``W c = sum_o c_o W[..., o]`` is a kernel with a single output channel:
the right-hand side is *one* single-image, single-channel convolution
(:func:`conv_reference`), ``1 / (B Cout)`` of the checked convolution.  The
backward check is the same identity for the transposed convolution, with signs
over the batch and the *input* channels ``d``:
``sum_{b,i} a_b d_i G[b, q, i] = conv^T(sum_b a_b dY_b, W d)[q]``
(:func:`transposed_reference`), summed over every convolution that reads the
checked activation.

**Coefficients.** ``a`` and ``c`` are Rademacher (``+-1``) vectors drawn from an
explicit key that the untrusted side never sees (:func:`coefficients`).

**Tolerance.** Floating-point results are not exact, so each pixel ``p`` gets
an acceptance bound derived from magnitudes only (never from the result being
checked, which the adversary controls)::

    bound_p = eps * (M_p + FLOOR * max_q M_q),
    M_p     = conv(sum_b |R_b|, sum_o |W_o|)[p]  >=  sum_{b,o} (|R_b| * |W_o|)[p],
    eps     = 2 LAMBDA (sqrt(n) + sqrt(B) + sqrt(K)) u  +  2 u_io.

``M_p`` is the sum, over the ``B K`` results combined at ``p``, of the sums of
absolute products each is made of (with signs ``+-1``, ``|a_b c_o| = 1``, so
``M`` does not depend on the coefficients and is computed once).  Every
rounding error of a correct computation of ``Y`` (dot products of length
``n = kh kw C``; ``n = kh kw Cout`` backward) and of the TEE's own reductions
(lengths ``B`` and ``K``, the channel count combined) and reference convolution
(length ``n``) is, by the probabilistic rounding error analysis of Higham and
Mary (SIAM J. Sci. Comput. 2019; 2020), at most ``LAMBDA sqrt(length) u``
times the sum of the absolute values of its terms, except with probability
about ``2 exp(-LAMBDA^2 / 2) = 2.5e-14`` for ``LAMBDA = 8``, whatever the
summation order or blocking (so results computed by XLA with a different
algorithm, on another device, with ``Precision.HIGHEST``, pass); the factor 2
counts the accelerator's and the TEE's computations.  ``u = 2^-24`` is the
float32 unit roundoff.  The combination over ``(b, o)`` is bounded by the
plain sum (no cancellation is assumed), which in practice leaves a wide
margin: measured discrepancies of correct results (direct, im2col,
per-channel, FFT and float64-rounded convolutions, random and ReLU-like data,
1x1 to 3x3 kernels, strides 1 and 2) stay below ``1.3 u M_p`` for tiny
convolutions and ``0.07 u M_p`` at 64 channels, against ``eps >= 48 u`` (138 u
for a 3x3 convolution of 3 channels, batch 2: the test's, where correct
results reach 2% of the bound).  ``FLOOR * max M`` (``FLOOR = 2^-6``) covers
algorithms whose error is bounded by global rather than local magnitudes (FFT
convolution) and pixels whose own magnitude is zero.  For results delivered in
a narrower dtype (bfloat16 residuals, unit roundoff ``u_io``), the TEE rounds
``R``, ``W`` (and ``dY``) to that dtype itself, as the accelerator did, so
input rounding is no error; ``2 u_io`` covers the rounding of each result
(accumulation is assumed at least float32).  The bound is rigorous for any
summation order if ``LAMBDA sqrt(length)`` is replaced by ``length``; the
probabilistic constant is what makes the check sensitive.

**What is detected.** A correct result stays within the bound (in the tests,
within 2% of it; bfloat16 results within half of it).  If one element ``Y[b, p, o]`` is changed by
``delta``, the discrepancy at ``p`` moves by exactly ``a_b c_o delta = +-delta``,
never less: with Rademacher coefficients the tampered element's weight cannot
be small by chance.  So a change of more than the **tolerance**
``2 bound_p`` (:func:`element_tolerance`) leaves a discrepancy above
``2 bound_p - bound_p`` and is rejected with certainty: the miss probability
of one repetition is 0, and ``REPETITIONS = 1`` meets the 9,999-in-10,000
requirement (10,000 of 10,000).  (With Gaussian coefficients the weight
``|a_b c_o|`` is below 1/2 with probability 0.59; missing a change of twice the
bound would then need ``18`` repetitions for a ``1e-4`` miss rate.)  A pattern
of several changes can cancel: for any nonzero change at a pixel, one
repetition misses it with probability at most ``3/4`` in exact arithmetic (two
equal changes in one sample and two channels cancel when ``c_o = -c_o'``:
probability 1/2), ``(3/4)^m`` with ``m`` repetitions and, because every step
draws fresh coefficients, ``(3/4)^s`` over ``s`` tampered steps.

**Cost** (:func:`check_macs`): per repetition, the two sign-combinations
(``B H W C`` and ``B Ho Wo K`` additions), the combined kernel (``kh kw C K``)
and one single-channel convolution (``Ho Wo kh kw C``); once per check, the
magnitude convolution.  For a 3x3 convolution with 64 input and output
channels at 32x32 and batch 32 that is 0.6% of the checked convolution's MACs.

**In a staged model** (:mod:`asymml_jax.stages`, ``verify_untrusted``): trusted
stage ``k+1`` checks every ``conv(R, W)`` it receives against the ``R`` it
released; for the backward check, stage ``k`` releases ``R`` through
:func:`watch_residual`, which also emits a zero *probe*; every convolution
reading ``R`` passes its ``Y_R`` through :func:`tap_output`, whose VJP turns
the output gradient ``dY_R`` it releases into the reference and bound, as the
probe's cotangent (autodiff sums it over the readers); the VJP of
:func:`watch_residual` receives the accelerator's residual gradient and the
probe's cotangent and compares them.  Failures raise :class:`IntegrityError`
out of the jitted program (:func:`enforce`, :func:`typed_errors`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import threading
from typing import Any, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from asymml_jax import ops

HIGHEST = jax.lax.Precision.HIGHEST
UNIT_ROUNDOFF = 2.0 ** -24    # float32
LAMBDA = 8.0                  # probabilistic rounding-error constant (module docstring)
FLOOR = 2.0 ** -6             # share of the largest magnitude every pixel tolerates
REPETITIONS = 1               # single-element changes are caught with certainty
DIRECTIONS = ("forward", "backward")


class IntegrityError(RuntimeError):
  """An accelerator result failed its Freivalds check (wrong, tampered or non-finite)."""


class CheckResult(NamedTuple):
  """Outcome of one check.

  Attributes:
    ok: scalar bool, ``worst <= 1`` and the result finite.
    worst: scalar float32, ``max_p |lhs_p - rhs_p| / bound_p``: the largest
      discrepancy in units of the acceptance bound (NaN/inf for a non-finite result).
  """

  ok: jax.Array
  worst: jax.Array


# ------------------------------------------------------------------ pieces
def coefficients(key: jax.Array, batch: int, channels: int,
                 repetitions: int = REPETITIONS) -> tuple[jax.Array, jax.Array]:
  """Rademacher signs ``a`` (``(m, batch)``) and ``c`` (``(m, channels)``) from ``key``."""
  if repetitions < 1:
    raise ValueError(f"repetitions must be >= 1, got {repetitions}")
  # One threefry call: the top bit of each word is a fair, independent sign.
  bits = jax.random.bits(key, (repetitions, batch + channels), jnp.uint32)
  signs = 1.0 - 2.0 * (bits >> 31).astype(jnp.float32)
  return signs[:, :batch], signs[:, batch:]


def _io_roundoff(dtype) -> float:
  """Unit roundoff of a result dtype narrower than float32, else 0."""
  fi = jnp.finfo(dtype)
  return float(fi.eps) / 2 if fi.nmant < jnp.finfo(jnp.float32).nmant else 0.0


def error_factor(n: int, batch: int, channels: int, result_dtype: Any = jnp.float32) -> float:
  """``eps`` of the bound (module docstring): ``2 LAMBDA (sqrt n + sqrt B + sqrt K) u + 2 u_io``."""
  acc = 2.0 * LAMBDA * (math.sqrt(n) + math.sqrt(batch) + math.sqrt(channels)) * UNIT_ROUNDOFF
  return acc + 2.0 * _io_roundoff(result_dtype)


def _as_delivered(x: jax.Array, dtype) -> jax.Array:
  """``x`` rounded to the dtype the accelerator computed in, as float32."""
  x = x.astype(jnp.float32)
  if _io_roundoff(dtype):
    x = x.astype(dtype).astype(jnp.float32)
  return x


def _batch_abs_sum(x: jax.Array) -> jax.Array:
  """``sum_b |x_b|`` as a matrix product (XLA's CPU reduction over the major axis is slow)."""
  return jnp.einsum("b,b...->...", jnp.ones(x.shape[:1], x.dtype), jnp.abs(x), precision=HIGHEST)


def _bound(magnitude: jax.Array, factor: float) -> jax.Array:
  return factor * (magnitude + FLOOR * jnp.max(magnitude))


def compare(lhs: jax.Array, rhs: jax.Array, bound: jax.Array) -> CheckResult:
  """Accepts iff ``|lhs - rhs| <= bound`` at every pixel and repetition.

  Args:
    lhs: ``(m, ...)`` projections of the result being checked.
    rhs: ``(m, ...)`` the TEE's references.
    bound: ``(...)`` acceptance bound per pixel.
  """
  tiny = jnp.finfo(jnp.float32).tiny
  ratio = jnp.abs(lhs - rhs) / jnp.maximum(bound, tiny)[None]
  worst = jnp.max(ratio)
  ok = jnp.all(jnp.isfinite(lhs)) & (worst <= 1.0)
  return CheckResult(ok=ok, worst=worst)


def element_tolerance(bound: jax.Array) -> jax.Array:
  """Change of one result element that is always detected: twice the bound."""
  return 2.0 * bound


# ----------------------------------------------------------------- forward
def conv_reference(r: jax.Array, kernel: jax.Array, spec: ops.ConvSpec, a: jax.Array,
                   c: jax.Array, result_dtype: Any = jnp.float32
                   ) -> tuple[jax.Array, jax.Array]:
  """``conv(sum_b a_b R_b, W c)`` per repetition and the acceptance bound.

  Args:
    r: ``(B, H, W, C)`` what the TEE sent.
    kernel: ``(kh, kw, C, Cout)`` the public kernel.
    spec: the convolution's strides and padding.
    a, c: ``(m, B)`` and ``(m, Cout)`` signs (:func:`coefficients`).
    result_dtype: the dtype the accelerator computed in (``Y``'s dtype).

  Returns:
    ``(rhs (m, Ho, Wo), bound (Ho, Wo))``.
  """
  r = _as_delivered(r, result_dtype)
  kernel = _as_delivered(kernel, result_dtype)
  b, _, _, cin = r.shape
  kh, kw, _, cout = kernel.shape
  x = jnp.einsum("mb,bhwc->mhwc", a, r, precision=HIGHEST)
  w = jnp.einsum("hwco,mo->mhwc", kernel, c, precision=HIGHEST)

  def one(x1, w1):
    return ops.conv(x1[None], w1[..., None], spec.strides, spec.padding)[0, ..., 0]

  rhs = jax.vmap(one)(x, w)
  magnitude = one(_batch_abs_sum(r), jnp.sum(jnp.abs(kernel), axis=-1))
  return rhs, _bound(magnitude, error_factor(kh * kw * cin, b, cout, result_dtype))


def conv_combination(y: jax.Array, a: jax.Array, c: jax.Array) -> jax.Array:
  """``sum_{b,o} a_b c_o Y[b, :, :, o]`` per repetition: ``(m, Ho, Wo)``."""
  y = y.astype(jnp.float32)
  t = jnp.einsum("bhwo,mo->mbhw", y, c, precision=HIGHEST)
  return jnp.einsum("mbhw,mb->mhw", t, a, precision=HIGHEST)


def check_conv(y: jax.Array, r: jax.Array, kernel: jax.Array, spec: ops.ConvSpec,
               key: jax.Array, *, repetitions: int = REPETITIONS) -> CheckResult:
  """Freivalds check of ``Y = conv(R, W)`` returned by the accelerator.

  Args:
    y: ``(B, Ho, Wo, Cout)`` the result (its dtype is the accelerator's).
    r: ``(B, H, W, C)`` the input the TEE sent.
    kernel: ``(kh, kw, C, Cout)``.
    spec: strides and padding (as :func:`asymml_jax.ops.untrusted_conv`).
    key: a key the accelerator does not know (never a default key).
    repetitions: independent sign draws.
  """
  a, c = coefficients(key, r.shape[0], kernel.shape[-1], repetitions)
  rhs, bound = conv_reference(r, kernel, spec, a, c, y.dtype)
  return compare(conv_combination(y, a, c), rhs, bound)


# ---------------------------------------------------------------- backward
def _conv_transpose(x: jax.Array, kernel: jax.Array, spec: ops.ConvSpec,
                    input_hw: tuple[int, int]) -> jax.Array:
  """``conv^T(x, k)`` for one image ``x (Ho, Wo, Cout)`` and ``k (kh, kw, Cout)``: ``(H, W)``."""
  k = kernel[:, :, None, :]
  zeros = jnp.zeros((1, *input_hw, 1), jnp.float32)
  _, vjp = jax.vjp(lambda z: ops.conv(z, k, spec.strides, spec.padding), zeros)
  return vjp(x[None])[0][0, ..., 0]


def transposed_reference(dy: jax.Array, kernel: jax.Array, spec: ops.ConvSpec,
                         a: jax.Array, d: jax.Array, input_hw: tuple[int, int],
                         result_dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
  """``conv^T(sum_b a_b dY_b, W d)`` per repetition and the acceptance bound.

  Args:
    dy: ``(B, Ho, Wo, Cout)`` the output gradient the TEE released.
    kernel: ``(kh, kw, C, Cout)``.
    spec: strides and padding of the forward convolution.
    a, d: ``(m, B)`` and ``(m, C)`` signs over the batch and the input channels.
    input_hw: ``(H, W)`` of the convolution's input.
    result_dtype: the dtype the accelerator computed in.

  Returns:
    ``(rhs (m, H, W), bound (H, W))``.
  """
  dy = _as_delivered(dy, result_dtype)
  kernel = _as_delivered(kernel, result_dtype)
  b = dy.shape[0]
  kh, kw, cin, cout = kernel.shape
  x = jnp.einsum("mb,bhwo->mhwo", a, dy, precision=HIGHEST)
  w = jnp.einsum("hwco,mc->mhwo", kernel, d, precision=HIGHEST)
  one = functools.partial(_conv_transpose, spec=spec, input_hw=tuple(input_hw))
  rhs = jax.vmap(one)(x, w)
  magnitude = one(_batch_abs_sum(dy), jnp.sum(jnp.abs(kernel), axis=2))
  return rhs, _bound(magnitude, error_factor(kh * kw * cout, b, cin, result_dtype))


def transposed_combination(dr: jax.Array, a: jax.Array, d: jax.Array) -> jax.Array:
  """``sum_{b,i} a_b d_i G[b, :, :, i]`` per repetition: ``(m, H, W)``."""
  dr = dr.astype(jnp.float32)
  t = jnp.einsum("bhwc,mc->mbhw", dr, d, precision=HIGHEST)
  return jnp.einsum("mbhw,mb->mhw", t, a, precision=HIGHEST)


def check_transposed(dr: jax.Array, dy: jax.Array, kernel: jax.Array, spec: ops.ConvSpec,
                     key: jax.Array, *, repetitions: int = REPETITIONS,
                     result_dtype: Any = None) -> CheckResult:
  """Freivalds check of ``G = conv^T(dY, W)`` (the residual gradient) from the accelerator.

  Args:
    dr: ``(B, H, W, C)`` the result.
    dy: ``(B, Ho, Wo, Cout)`` the output gradient the TEE sent.
    kernel: ``(kh, kw, C, Cout)``.
    spec: strides and padding of the forward convolution.
    key: a key the accelerator does not know.
    repetitions: independent sign draws.
    result_dtype: the dtype the accelerator computed in (default ``dr``'s).
  """
  a, d = coefficients(key, dr.shape[0], dr.shape[-1], repetitions)
  rhs, bound = transposed_reference(dy, kernel, spec, a, d, dr.shape[1:3],
                                    dr.dtype if result_dtype is None else result_dtype)
  return compare(transposed_combination(dr, a, d), rhs, bound)


# -------------------------------------------------------------------- cost
def check_macs(spec: ops.ConvSpec, batch: int, h: int, w: int,
               repetitions: int = REPETITIONS) -> dict[str, int]:
  """Multiply-accumulates of the checks of one convolution on a batch.

  Returns:
    ``{"conv": B Ho Wo kh kw C Cout (the checked convolution, or its transpose),
    "forward": ..., "backward": ...}`` (sign flips counted as MACs).
  """
  ho, wo = spec.output_hw(h, w)
  kh, kw = spec.kernel_size
  c, k = spec.in_features, spec.features
  conv = batch * ho * wo * kh * kw * c * k
  fwd_rep = batch * h * w * c + kh * kw * c * k + ho * wo * kh * kw * c + batch * ho * wo * (k + 1)
  fwd_once = batch * h * w * c + kh * kw * c * k + ho * wo * kh * kw * c
  bwd_rep = batch * ho * wo * k + kh * kw * c * k + ho * wo * kh * kw * k + batch * h * w * (c + 1)
  bwd_once = batch * ho * wo * k + kh * kw * c * k + ho * wo * kh * kw * k
  return {"conv": conv, "forward": repetitions * fwd_rep + fwd_once,
          "backward": repetitions * bwd_rep + bwd_once}


# ------------------------------------------------------------- enforcement
_PENDING: collections.deque = collections.deque(maxlen=64)
_LOCK = threading.Lock()


def _message(stage: int, direction: str, names: Mapping[str, str], worst: Mapping) -> str:
  bad = ", ".join(f"{names[k]} (discrepancy {float(worst[k]):.3g}x the bound)"
                  for k in sorted(worst))
  what = ("the accelerator's conv(R, W)" if direction == "forward" else
          "the accelerator's residual gradient conv^T(dY_R, W)")
  return (f"integrity check failed in trusted stage {stage} ({direction}): {what} is "
          f"wrong for {bad}; the untrusted result was rejected")


def _fail_if_bad(stage, direction, names, oks, worst):
  failed = {k: worst[k] for k in oks if not bool(np.asarray(oks[k]))}
  if failed:
    err = IntegrityError(_message(stage, direction, names, failed))
    with _LOCK:
      _PENDING.append(err)
    raise err


def enforce(results: Mapping[str, CheckResult], *, stage: int, direction: str,
            labels: Mapping[str, str] | None = None) -> None:
  """Raises :class:`IntegrityError` (out of a jitted program) if any check failed.

  Inside ``jit`` the error reaches the caller as a runtime error of the
  program; :func:`typed_errors` turns it back into the :class:`IntegrityError`.

  Args:
    results: checks by name (conv or site).
    stage: trusted stage index (for the message).
    direction: ``forward`` or ``backward``.
    labels: optional human-readable names by key.
  """
  if direction not in DIRECTIONS:
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
  if not results:
    return
  names = {k: (labels or {}).get(k, repr(k)) for k in results}
  jax.debug.callback(functools.partial(_fail_if_bad, stage, direction, names),
                     {k: v.ok for k, v in results.items()},
                     {k: v.worst for k, v in results.items()})


def _take_pending() -> IntegrityError | None:
  with _LOCK:
    err = _PENDING.popleft() if _PENDING else None
    _PENDING.clear()
  return err


@contextlib.contextmanager
def typed_errors() -> Iterator[None]:
  """Re-raises an :class:`IntegrityError` that an :func:`enforce` inside a program raised.

  Wrap the call *and* the wait for its results (``jax.block_until_ready``).
  """
  _take_pending()  # a stale failure never explains a later error
  try:
    yield
  except IntegrityError:
    raise
  except Exception as e:
    err = _take_pending()
    if err is not None:
      raise err from e
    raise


# ------------------------------------------------- staged-model plumbing
@dataclasses.dataclass(frozen=True, kw_only=True)
class ResidualCheck:
  """Static settings of the backward check of one released residual (jit-static).

  Attributes:
    site: the activation's name (for messages).
    stage: the trusted stage that released it.
    readers: names of the convolutions reading it (for messages).
    repetitions: independent sign draws.
  """

  site: str
  stage: int
  readers: tuple[str, ...] = ()
  repetitions: int = REPETITIONS

  def __post_init__(self):
    if self.repetitions < 1:
      raise ValueError(f"repetitions must be >= 1, got {self.repetitions}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputTap:
  """Static settings of one reader's share of a backward check (jit-static).

  Attributes:
    spec: the convolution reading the residual.
    input_hw: ``(H, W)`` of its input.
    result_dtype: name of the dtype the accelerator computes in.
    repetitions: as the site's :class:`ResidualCheck`.
  """

  spec: ops.ConvSpec
  input_hw: tuple[int, int]
  result_dtype: str = "float32"
  repetitions: int = REPETITIONS


def probe_shape(residual_shape: tuple[int, ...], repetitions: int = REPETITIONS) -> tuple[int, ...]:
  """Shape of a residual's probe: ``(m + 1, H, W)`` (references, then the bound)."""
  return (repetitions + 1, *residual_shape[1:3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def watch_residual(r: jax.Array, key: jax.Array, cfg: ResidualCheck):
  """Identity on a released residual ``R``, plus a zero probe (module docstring).

  Returns:
    ``(r, probe)``.  The VJP checks the cotangent of ``r`` (the accelerator's
    residual gradient) against the cotangent of ``probe`` (references and
    bounds from :func:`tap_output`) and raises :class:`IntegrityError`.
  """
  del key
  return r, jnp.zeros(probe_shape(r.shape, cfg.repetitions), jnp.float32)


def _watch_fwd(r, key, cfg):
  return watch_residual(r, key, cfg), (key, r.shape)


def _watch_bwd(cfg, res, cts):
  key, shape = res
  dr, dprobe = cts
  a, d = coefficients(key, shape[0], shape[-1], cfg.repetitions)
  m = cfg.repetitions
  result = compare(transposed_combination(dr, a, d), dprobe[:m], dprobe[m])
  readers = f" (read by {', '.join(cfg.readers)})" if cfg.readers else ""
  enforce({cfg.site: result}, stage=cfg.stage, direction="backward",
          labels={cfg.site: f"site {cfg.site!r}{readers}"})
  return dr, None


watch_residual.defvjp(_watch_fwd, _watch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def tap_output(y: jax.Array, probe: jax.Array, kernel: jax.Array, key: jax.Array,
               cfg: OutputTap) -> jax.Array:
  """Identity on a reader's ``Y_R``; its VJP writes the reference of ``conv^T(dY_R, W)``.

  Args:
    y: the accelerator's ``conv(R, W)`` (float32).
    probe: the residual's probe (:func:`watch_residual`).
    kernel: the reader's kernel.
    key: the residual's check key (the same as :func:`watch_residual`'s).
    cfg: static settings.

  Returns:
    ``y``.  Cotangents: ``dY_R`` unchanged for ``y``; for ``probe``,
    ``(conv^T(sum_b a_b dY_b, W d) per repetition, bound)``.
  """
  del probe, kernel, key, cfg
  return y


def _tap_fwd(y, probe, kernel, key, cfg):
  return y, (kernel, key, probe.shape)


def _tap_bwd(cfg, res, dy):
  kernel, key, _ = res
  a, d = coefficients(key, dy.shape[0], kernel.shape[2], cfg.repetitions)
  rhs, bound = transposed_reference(dy, kernel, cfg.spec, a, d, cfg.input_hw,
                                    jnp.dtype(cfg.result_dtype))
  return dy, jnp.concatenate([rhs, bound[None]], axis=0), None, None


tap_output.defvjp(_tap_fwd, _tap_bwd)

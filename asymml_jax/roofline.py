"""Roofline accounting of the trusted stages (the benchmark's performance method).

Two halves:

* :func:`measure_peaks`: the best one process does on this machine: a large
  float32 matmul's MAC rate and the bandwidth of a streaming elementwise pass.
  ``python -m asymml_jax.roofline [--cores=0]`` prints them as JSON, measured
  on the given cores (how the benchmark measures the enclave's core, in the
  enclave's environment).
* :func:`stage_costs`: a cost model (MACs, float32 bytes read and written) of
  every trusted stage of a staged model under a plan, forward and backward,
  after :func:`asymml_jax.stages.trusted_stage`; :func:`roofline_time` turns one
  into the time it needs at the peaks.

The model (a model, not a trace: XLA fuses and re-reads as it likes):

* forward stage ``k``, per conv of group ``k-1``: *trusted*: the whole conv
  (``B HW_out k^2 C Cout`` MACs; reads X and the kernel, writes Y); *split*:
  the kernel fold ``W' = W x_C U`` (``k^2 C r Cout`` per sample, once for
  ``per_batch``), the low-rank conv ``conv(P, W')`` (``B HW_out k^2 r Cout``)
  and ``Y = Y_L + Y_R + b`` (reads two outputs, writes one); *dense*: nothing;
* the stage module (norm, ReLU, pooling, head): no MACs; reads its inputs
  (group ``k-1``'s outputs, the image in stage 0) and writes its outputs;
* per split site stage ``k`` produces: the subspace estimate
  (:func:`decomposition_macs`; reads X once) and ``P = XU``, ``R = X - P U^T``
  (:func:`projection_macs`; reads X twice, writes R and P);
* backward stage ``k``: :data:`BACKWARD_FACTOR` times the forward conv, fold
  and low-rank MACs (input and weight gradients), once the projection MACs
  (``U`` is a constant for autodiff, so the estimate has no backward), twice
  the forward bytes but the estimate's; with gradient protection, per split
  conv, the output-gradient decomposition and the TEE's gradient shares
  (:func:`gradient_protection_macs`);
* ``whole_step/0`` (``tee_only``: the whole model in one call): the sum of
  all stages, forward and backward.

Not modelled: the classifier head's matmul, the loss, DP noise, integrity
checks, shortcut carries.  :mod:`asymml_jax.plan` counts its MACs with the same
functions, so a plan's trusted MACs are the sum of its stages' MACs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from asymml_jax.ops import ConvSpec

if TYPE_CHECKING:  # plan imports this module
  from asymml_jax.models.base import StagedModel
  from asymml_jax.plan import Plan

BYTES_PER_ELEMENT = 4
BACKWARD_FACTOR = 2  # a conv's backward: input gradient + weight gradient


# ------------------------------------------------------------------ peaks
@dataclasses.dataclass(frozen=True)
class Peaks:
  """Best-case rates of one process: float32 matmul MAC/s and streaming bytes/s."""

  matmul_macs_per_s: float
  stream_bytes_per_s: float

  def to_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Peaks":
    return cls(float(d["matmul_macs_per_s"]), float(d["stream_bytes_per_s"]))


def _best_seconds(step: Callable[[Any], Any], state: Any, repeats: int) -> float:
  """Fastest of ``repeats`` timed calls ``state = step(state)``, after one untimed
  (compilation, and memory the next call reuses)."""
  import jax  # pylint: disable=g-import-not-at-top
  state = jax.block_until_ready(step(state))
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    state = jax.block_until_ready(step(state))
    best = min(best, time.perf_counter() - t0)
  return max(best, 1e-9)


def measure_peaks(matmul_size: int = 1536, stream_bytes: int = 64 << 20,
                  repeats: int = 5) -> Peaks:
  """Measures :class:`Peaks` (about a second on one CPU core).

  Args:
    matmul_size: ``n`` of the jitted ``n x n`` float32 matmul (``n^3`` MACs).
    stream_bytes: size of the array of the jitted ``x * a + b``, counted as
      read once and written once; the input buffer is donated and the result
      fed back, so every call streams through memory already in use (warm).
    repeats: timed calls of each after a warm-up; the fastest counts.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = int(matmul_size)
  m = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
  t_mm = _best_seconds(lambda _: mm(m, m), None, repeats)
  size = max(1, stream_bytes // BYTES_PER_ELEMENT)
  a, b = jnp.float32(1.0001), jnp.float32(0.5)
  axpb = jax.jit(lambda x, a, b: x * a + b, donate_argnums=0)
  t_st = _best_seconds(lambda x: axpb(x, a, b), jnp.ones((size,), jnp.float32), repeats)
  return Peaks(matmul_macs_per_s=n ** 3 / t_mm,
               stream_bytes_per_s=2 * size * BYTES_PER_ELEMENT / t_st)


# ------------------------------------------------------------------ costs
@dataclasses.dataclass(frozen=True)
class StageCost:
  """MACs and float32 bytes read and written of (part of) a trusted stage."""

  macs: int = 0
  bytes_read: int = 0
  bytes_written: int = 0

  @property
  def bytes(self) -> int:
    return self.bytes_read + self.bytes_written

  def __add__(self, other: "StageCost") -> "StageCost":
    return StageCost(self.macs + other.macs, self.bytes_read + other.bytes_read,
                     self.bytes_written + other.bytes_written)

  def scaled(self, macs: int, nbytes: int | None = None) -> "StageCost":
    """MACs times ``macs`` and bytes times ``nbytes`` (default: ``macs``)."""
    nb = macs if nbytes is None else nbytes
    return StageCost(self.macs * macs, self.bytes_read * nb, self.bytes_written * nb)

  def to_dict(self) -> dict[str, int]:
    return {**dataclasses.asdict(self), "bytes": self.bytes}


def _cost(macs: int, read_elems: int, written_elems: int) -> StageCost:
  return StageCost(int(macs), BYTES_PER_ELEMENT * int(read_elems),
                   BYTES_PER_ELEMENT * int(written_elems))


def roofline_time(cost: StageCost, peaks: Peaks) -> float:
  """Seconds at the peaks: ``max(MACs / MAC rate, bytes / stream rate)``."""
  return max(cost.macs / peaks.matmul_macs_per_s, cost.bytes / peaks.stream_bytes_per_s)


def decomposition_macs(h: int, w: int, c: int, r: int, num_iters: int, batch_size: int,
                       scope: str) -> int:
  """MACs of the subspace estimate of ``U`` for a ``B x h x w x c`` activation.

  Mirrors :func:`asymml_jax.decomposition.principal_channels`: ``U`` is
  estimated from the strided pixel sample of
  :func:`asymml_jax.decomposition.pixel_sample` (``n`` rows: a sample's ``HW``
  pixels, or the batch's ``B HW`` for ``per_batch``).  A tall sample
  (``n >= GRAM_MIN_PIXELS_PER_CHANNEL C``) forms the ``C x C`` Gram once
  (``n C^2``) and iterates on it (``(n_iter + 1) C^2 k``); otherwise every
  iteration and the Rayleigh-Ritz step multiply by ``X`` and ``X^T``
  (``(2 n_iter + 2) n C k``), with ``k = r + OVERSAMPLE`` start columns.
  """
  from asymml_jax import decomposition as dec  # pylint: disable=g-import-not-at-top
  rows = h * w * (batch_size if scope == "per_batch" else 1)
  stride = -(-rows // dec.sample_rows(c))
  n = -(-rows // stride) if stride >= 2 else rows
  k = min(c, r + dec.OVERSAMPLE)
  if n >= dec.GRAM_MIN_PIXELS_PER_CHANNEL * c:
    one = n * c * c + (num_iters + 1) * c * c * k
  else:
    one = (2 * num_iters + 2) * n * c * k
  return one * (1 if scope == "per_batch" else batch_size)


def projection_macs(h: int, w: int, c: int, r: int, batch_size: int) -> int:
  """MACs of ``P = XU`` and ``R = X - P U^T``: ``2 HW C r`` per sample."""
  return 2 * batch_size * h * w * c * r


def _folds(batch_size: int, scope: str) -> int:
  return batch_size if scope == "per_sample" else 1


def fold_macs(conv: ConvSpec, r: int, batch_size: int, scope: str) -> int:
  """MACs of the kernel folds ``W' = W x_C U``: ``k^2 C r Cout`` per fold."""
  kh, kw = conv.kernel_size
  return _folds(batch_size, scope) * kh * kw * conv.in_features * r * conv.features


def gradient_protection_macs(conv: ConvSpec, h: int, w: int, r: int, num_iters: int,
                             batch_size: int) -> int:
  """TEE MACs of protecting ``conv``'s output gradient (:mod:`asymml_jax.privacy.gradients`).

  Per sample, with ``r`` principal output channels: the decomposition of
  ``dY`` over its ``Cout`` channels, the fold ``W Q`` (``k^2 C Cout r``),
  ``conv^T(P, W Q)`` and ``corr(R, P)`` (``HW_out k^2 C r`` each) and
  ``corr(R, P) Q^T`` (``k^2 C r Cout``).
  """
  ho, wo = conv.output_hw(h, w)
  kh, kw = conv.kernel_size
  cout = conv.features
  decomp = (decomposition_macs(ho, wo, cout, r, num_iters, batch_size, "per_sample")
            + projection_macs(ho, wo, cout, r, batch_size))
  k2c = kh * kw * conv.in_features
  return decomp + batch_size * (2 * k2c * cout * r + 2 * ho * wo * k2c * r)


def conv_cost(conv: ConvSpec, h: int, w: int, batch_size: int) -> StageCost:
  """A fully trusted conv: reads X and the kernel, writes Y."""
  ho, wo = conv.output_hw(h, w)
  kh, kw = conv.kernel_size
  return _cost(batch_size * conv.macs(h, w),
               batch_size * h * w * conv.in_features + kh * kw * conv.in_features * conv.features,
               batch_size * ho * wo * conv.features)


def lowrank_cost(conv: ConvSpec, h: int, w: int, r: int, batch_size: int,
                 scope: str) -> StageCost:
  """A split conv's trusted share: fold, ``conv(P, W')`` and ``Y = Y_L + Y_R + b``."""
  ho, wo = conv.output_hw(h, w)
  kh, kw = conv.kernel_size
  f, c, cout = _folds(batch_size, scope), conv.in_features, conv.features
  out = batch_size * ho * wo * cout
  fold = _cost(fold_macs(conv, r, batch_size, scope), kh * kw * c * cout + f * c * r,
               f * kh * kw * r * cout)
  low = _cost(batch_size * conv.macs(h, w, in_channels=r),
              batch_size * h * w * r + f * kh * kw * r * cout, out)
  return fold + low + _cost(0, 2 * out, out)


def decomposition_cost(h: int, w: int, c: int, r: int, num_iters: int, batch_size: int,
                       scope: str) -> tuple[StageCost, StageCost]:
  """``(estimate, projection)`` of one split site: the estimate reads X once;
  ``P = XU``, ``R = X - P U^T`` read X twice and write R and P."""
  x = batch_size * h * w * c
  est = _cost(decomposition_macs(h, w, c, r, num_iters, batch_size, scope), x, 0)
  proj = _cost(projection_macs(h, w, c, r, batch_size), 2 * x, x + batch_size * h * w * r)
  return est, proj


def gradient_protection_cost(conv: ConvSpec, h: int, w: int, r: int, num_iters: int,
                             batch_size: int) -> StageCost:
  """Backward extra of a protected split conv: reads ``dY`` three times and ``R``,
  writes ``dY_R``, the gradient's principal maps and ``dR``."""
  ho, wo = conv.output_hw(h, w)
  dy, x = batch_size * ho * wo * conv.features, batch_size * h * w * conv.in_features
  return _cost(gradient_protection_macs(conv, h, w, r, num_iters, batch_size),
               3 * dy + x, dy + batch_size * ho * wo * r + x)


# ------------------------------------------------------------------ stages
def _produced_sites(model: "StagedModel", k: int) -> list[str]:
  """Sites stage ``k`` hands to group ``k``."""
  if k >= len(model.groups):
    return []
  return list(dict.fromkeys(c.site for c in model.groups[k]))


def module_cost(model: "StagedModel", k: int, batch_size: int) -> StageCost:
  """Stage ``k``'s module: reads its inputs, writes its outputs (no MACs)."""
  if k == 0:
    read = batch_size * math.prod(model.input_shape)
  else:
    read = 0
    for c in model.groups[k - 1]:
      ho, wo = c.output_hw(*model.site_shapes[c.site][:2])
      read += batch_size * ho * wo * c.features
  if k == model.num_stages - 1:
    written = batch_size * model.num_classes
  else:
    written = sum(batch_size * math.prod(model.site_shapes[s])
                  for s in _produced_sites(model, k))
  return _cost(0, read, written)


def _stage_pass(model: "StagedModel", plan: "Plan", k: int, batch_size: int,
                backward: bool) -> StageCost:
  """One trusted stage, forward or backward (see the module docstring)."""
  cfg, b = plan.decomposition, batch_size
  f = BACKWARD_FACTOR if backward else 1
  cost = module_cost(model, k, b).scaled(f)
  for c in (model.groups[k - 1] if k > 0 else ()):
    sp = plan.sites[c.site]
    h, w, _ = model.site_shapes[c.site]
    if sp.mode == "trusted":
      cost += conv_cost(c, h, w, b).scaled(f)
    elif sp.split:
      cost += lowrank_cost(c, h, w, sp.r_max, b, sp.mode).scaled(f)
      if backward and plan.protects_gradients:
        cost += gradient_protection_cost(c, h, w, cfg.r_max(c.features), cfg.num_iters, b)
  for site in _produced_sites(model, k):
    sp = plan.sites[site]
    if sp.split:
      h, w, ch = model.site_shapes[site]
      est, proj = decomposition_cost(h, w, ch, sp.r_max, cfg.num_iters, b, sp.mode)
      cost += proj.scaled(1, BACKWARD_FACTOR) if backward else est + proj
  return cost


def stage_costs(model: "StagedModel", plan: "Plan", batch_size: int, train: bool, *,
                whole_step: bool = False) -> dict[str, StageCost]:
  """Cost of every trusted stage of ``model`` under ``plan`` (see the module docstring).

  Args:
    model: the staged model.
    plan: modes and ranks (its ``batch_size`` is not used).
    batch_size: rows of a batch.
    train: add the backward stages.
    whole_step: one ``"whole_step/0"`` entry, the sum (``tee_only``).

  Returns:
    ``{"forward/k": ..., "backward/k": ...}`` in execution order (backward
    from the last stage), keyed like the benchmark's per-stage timings.
  """
  n = model.num_stages
  out = {f"forward/{k}": _stage_pass(model, plan, k, batch_size, False) for k in range(n)}
  if train:
    out.update({f"backward/{k}": _stage_pass(model, plan, k, batch_size, True)
                for k in reversed(range(n))})
  if whole_step:
    return {"whole_step/0": sum(out.values(), StageCost())}
  return out


def _efficiency(roof: float, measured: float | None) -> float | None:
  return roof / measured if measured else None


def compare(costs: Mapping[str, StageCost], peaks: Peaks,
            measured: Mapping[str, float | None], measured_total: float | None) -> dict:
  """Roofline against measured time, per stage and for the whole step.

  Args:
    costs: :func:`stage_costs`.
    peaks: the rates of the process that ran the stages.
    measured: seconds per stage key (``None`` or absent: not measured).
    measured_total: the measured trusted seconds of the whole step.

  Returns:
    ``{"stages": {key: {macs, bytes_read, bytes_written, bytes, roofline_s,
    trusted_compute_s, efficiency}}, "whole_step": {...}}``, efficiency being
    ``roofline_s / measured`` (1: at the roofline).
  """
  stages = {}
  for key, cost in costs.items():
    roof, got = roofline_time(cost, peaks), measured.get(key)
    stages[key] = {**cost.to_dict(), "roofline_s": roof, "trusted_compute_s": got,
                   "efficiency": _efficiency(roof, got)}
  total = sum(costs.values(), StageCost())
  roof = sum(s["roofline_s"] for s in stages.values())
  return {"stages": stages,
          "whole_step": {**total.to_dict(), "roofline_s": roof,
                         "trusted_compute_s": measured_total,
                         "efficiency": _efficiency(roof, measured_total)}}


# ------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> None:
  """Prints :func:`measure_peaks` as one JSON line, optionally pinned to ``--cores``."""
  ap = argparse.ArgumentParser(prog="python -m asymml_jax.roofline", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--cores", default="", help="comma-separated cores to pin to first")
  ap.add_argument("--matmul_size", type=int, default=1536)
  ap.add_argument("--stream_mb", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args(argv)
  if args.cores:
    os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
  peaks = measure_peaks(args.matmul_size, args.stream_mb << 20, args.repeats)
  print(json.dumps(peaks.to_dict()), flush=True)


if __name__ == "__main__":
  main()

"""The trusted side's executor: per-step private state and the stage VJPs.

A :class:`TrustedExecutor` is what runs behind a trust boundary: in this
process for the ``local`` backend, inside the enclave process for
``enclave`` (the bridge serves one).  It holds the batch, the trusted RNG key
and, per step (a *tag*), the private state of every stage keyed by
``(tag, stage)``: the inputs of stage ``k+1`` (``P``, ``U``, shortcuts) and the
VJP of stage ``k``.  It answers two calls:

* ``forward(tag, k, yr, params_k, stats_k)`` -> ``(rs, loss, metrics, new_stats)``
* ``backward(tag, k, drs, dloss)`` -> ``(dyr, dparams_k)``

Backward of stage ``k`` combines the accelerator's cotangent of the residuals
``dR`` with the cotangent of the private outputs (``dP``, shortcut gradients)
that backward of stage ``k+1`` left in the state, so the sum
``dX = dR (I - U U^T) + dP U^T`` is formed in the trusted side only.  With
gradient protection, ``dR`` is itself the sum of the accelerator's
``conv^T(dY_R, W)`` and the TEE's ``conv^T(dY_L, W)``, which stage ``k+1``
leaves as the cotangent of the released residual it kept (``priv['r']``).  Calls are
idempotent for a repeated ``(tag, stage)`` (in an evaluation step, for its latest
stage: what earlier stages left is freed as soon as the next one has run); a
step's state is dropped when the backward of stage 0 is done (or :meth:`end` is
called).

Overlap (``overlap=True``, DESIGN section 3, step 3): parameters arrive in the
:func:`asymml_jax.stages.boundary_params` layout, so stage ``k``'s call
already carries the kernels of group ``k``'s split convolutions.  The low-rank
outputs ``Y_L`` of stage ``k+1`` then depend on nothing the accelerator still
has to compute: :meth:`TrustedExecutor.prefetch` computes them (and, in
training, their VJP) after stage ``k``'s reply has gone out, while the
accelerator convolves the residuals; a forward that finds them missing
computes them inside its own stage function (the ``local`` backend never
prefetches, so it compiles nothing more than without overlap).  In the
backward pass the kernels' gradient is returned with stage ``k``, the call
that carried them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from asymml_jax import calibration
from asymml_jax import integrity
from asymml_jax import plan as plan_lib
from asymml_jax import precision
from asymml_jax import stages as st
from asymml_jax.models.base import StagedModel
from asymml_jax.plan import Plan


class ExecutorError(RuntimeError):
  """A call the trusted executor cannot serve (unknown step, wrong order...)."""


@dataclasses.dataclass
class _Step:
  batch: dict
  train: bool
  priv: dict = dataclasses.field(default_factory=dict)      # k -> priv_in of stage k
  outputs: dict = dataclasses.field(default_factory=dict)   # k -> forward outputs
  vjps: dict = dataclasses.field(default_factory=dict)      # k -> vjp of stage k
  dpriv: dict = dataclasses.field(default_factory=dict)     # k -> cotangent of priv_in of k
  grads: dict = dataclasses.field(default_factory=dict)     # k -> (dyr, dparams_k)
  # Overlap layout only:
  early: dict = dataclasses.field(default_factory=dict)     # k -> kernels stage k-1 carried
  yl: dict = dataclasses.field(default_factory=dict)        # k -> Y_L of stage k
  yl_vjps: dict = dataclasses.field(default_factory=dict)   # k -> vjp of Y_L of stage k
  dearly: dict = dataclasses.field(default_factory=dict)    # k -> d(kernels stage k-1 carried)


def _stage_fn(model, plan, k, train, yr, params_k, stats_k, priv_in, batch, key, yl=None):
  def f(yr, params_k, priv_in, yl):
    outs, aux = st.trusted_stage(model, plan, k, params_k, stats_k, yr, priv_in,
                                 batch, key, train, yl=yl)
    return outs, aux
  if not train:
    return f(yr, params_k, priv_in, yl)
  outs, vjp, aux = jax.vjp(f, yr, params_k, priv_in, yl, has_aux=True)
  return outs, aux, vjp


def _activations_fn(model, plan, k, train, yr, params_k, stats_k, priv_in, batch, key,
                    yl=None):
  """Stage ``k``'s site activations before decomposition (the calibration pass)."""
  ys = st.combine_outputs(model, plan, k, params_k, yr, priv_in, key, train, yl)
  xs, _, _ = st.apply_module(model, k, params_k, stats_k, ys, priv_in, batch, train)
  return {site: x for site, x in xs.items() if site in plan.sites and plan.sites[site].split}


def _lowrank_fn(model, plan, k, train, kernels, priv_in):
  def f(kernels, priv_in):
    return st.lowrank_outputs(model, plan, k, kernels, priv_in)
  if not train:
    return f(kernels, priv_in), None
  return jax.vjp(f, kernels, priv_in)


@jax.jit
def _apply_vjp(vjp, yl_vjp, cotangents):
  """Stage VJP; with a prefetched ``Y_L``, its VJP too, summed into ``dP``, ``dU``, ``dW``."""
  dyr, dparams, dpriv_in, dyl = vjp(cotangents)
  if yl_vjp is not None:
    dkernels, dpriv_l = yl_vjp(dyl)
    dpriv_in = jax.tree_util.tree_map(jnp.add, dpriv_in, dpriv_l)
    dparams = _add_kernel_grads(dparams, dkernels)
  return dyr, dparams, dpriv_in


class TrustedExecutor:
  """Runs trusted stages for the untrusted program (see module docstring).

  Args:
    model: the staged model.
    plan: per-site modes.
    key: the trusted RNG key (decomposition start blocks, later noise); each
      step uses ``fold_in(key, step)``.

    overlap: parameters in the :func:`asymml_jax.stages.boundary_params`
      layout, low-rank outputs computed ahead by :meth:`prefetch`.
  """

  def __init__(self, model: StagedModel, plan: Plan, key: jax.Array, *,
               overlap: bool = False):
    self.model, self.plan, self._key, self.overlap = model, plan, key, overlap
    self._steps: dict[int, _Step] = {}
    self._jitted: dict[tuple, Any] = {}
    self._pending: dict[int, int] = {}  # tag -> the stage whose Y_L a prefetch may compute
    self._calibrated: set[int] = set()  # stages whose sites have calibrated ranks
    self.ranks: dict[str, int] = {}  # site -> calibrated static rank

  # ------------------------------------------------------------------ steps
  def begin(self, tag: int, batch: Mapping[str, Any], *, train: bool) -> None:
    """Starts step ``tag`` on ``batch`` (image, label, mask). Idempotent."""
    tag = int(tag)
    if tag in self._steps:
      return
    self.model.check_input(batch["image"])
    b = precision.cast_floats({k: jnp.asarray(v) for k, v in batch.items()})
    self._steps[tag] = _Step(batch=b, train=train)
    self._steps[tag].priv[0] = st.empty_private()

  def end(self, tag: int) -> None:
    self._steps.pop(int(tag), None)
    self._pending.pop(int(tag), None)

  @property
  def open_steps(self) -> tuple[int, ...]:
    return tuple(self._steps)

  def _step(self, tag: int) -> _Step:
    try:
      return self._steps[int(tag)]
    except KeyError:
      raise ExecutorError(f"unknown step {tag}: begin() was not called or it has ended") from None

  def _fn(self, k: int, train: bool, fn=_stage_fn):
    if (fn, k, train) not in self._jitted:
      self._jitted[(fn, k, train)] = jax.jit(functools.partial(
          fn, self.model, self.plan, k, train))
    return self._jitted[(fn, k, train)]

  def _lowrank(self, s: _Step, k: int):
    """Computes stage ``k``'s ``Y_L`` (and in training its VJP) ahead of its forward."""
    if k not in s.yl and st.split_convs(self.model, self.plan, k - 1):
      s.yl[k], vjp = self._fn(k, s.train, _lowrank_fn)(s.early[k], s.priv[k])
      if vjp is not None:
        s.yl_vjps[k] = vjp
    return s.yl.get(k)

  def prefetch(self) -> int:
    """Computes the ``Y_L`` that the next forward calls will need (overlap).

    Called by the enclave after a reply has gone out, while the accelerator
    works; blocks until they are computed.  Returns how many stages it served.
    """
    pending, self._pending = self._pending, {}
    done = 0
    for tag, k in pending.items():
      s = self._steps.get(tag)
      if s is None or k in s.outputs or k not in s.priv:
        continue
      yl = self._lowrank(s, k)
      if yl is not None:
        jax.block_until_ready(yl)
        done += 1
    return done

  def _call(self, fn, *args):
    """``fn(*args)``; with integrity checks on, waits for it and raises their typed error."""
    if not self.plan.verify_untrusted:
      return fn(*args)
    with integrity.typed_errors():
      return jax.block_until_ready(fn(*args))

  # ---------------------------------------------------------------- forward
  def forward(self, tag: int, k: int, yr: Mapping, params_k: Mapping,
              stats_k: Mapping):
    """Trusted stage ``k`` of step ``tag``; returns ``(rs, loss, metrics, new_stats)``."""
    s = self._step(tag)
    if k in s.outputs:
      return s.outputs[k]
    if k not in s.priv:
      raise ExecutorError(f"step {tag}: stage {k} called before stage {k - 1}")
    key = st.step_key(self._key, tag)
    yl = None
    if self.overlap:
      s.early[k + 1] = params_k["next"]
      params_k = st.merge_boundary(params_k, s.early.get(k, {}))
      yl = s.yl.get(k)  # prefetched; else the stage computes it (no extra program)
      if yl is None:
        s.yl_vjps.pop(k, None)
    self._calibrate(s, k, (yr, params_k, stats_k, s.priv[k], s.batch, key, yl))
    res = self._call(self._fn(k, s.train), yr, params_k, stats_k, s.priv[k], s.batch, key,
                     yl)
    s.yl.pop(k, None)  # consumed (its VJP, if any, stays for the backward)
    if s.train:
      (rs, priv_out, loss), (new_stats, metrics), vjp = res
      s.vjps[k] = vjp
    else:
      (rs, priv_out, loss), (new_stats, metrics) = res
    s.priv[k + 1] = priv_out
    s.outputs[k] = (rs, loss, metrics, new_stats)
    if not s.train:  # no backward: only the last answer may still be asked again
      s.priv.pop(k, None)
      s.outputs.pop(k - 1, None)
    if self.overlap and k + 1 < self.model.num_stages:
      self._pending[int(tag)] = k + 1  # one entry per open step: bounded without prefetch
    if not s.train and k == self.model.num_stages - 1:
      out = s.outputs[k]
      self.end(tag)
      return out
    return s.outputs[k]

  def _calibrate(self, s: _Step, k: int, args: tuple) -> None:
    """Fixes the static rank of stage ``k``'s split sites from this batch (once).

    ``rank_plan='calibrate'`` (:mod:`asymml_jax.calibration`): runs before
    stage ``k`` is first compiled, so every program that touches a site sees
    one rank for it.  Stage ``k+1``'s programs are built after this call.
    """
    if self.plan.decomposition.rank_plan != "calibrate" or k in self._calibrated:
      return
    if not st.split_convs(self.model, self.plan, k):  # no split site is decomposed here
      self._calibrated.add(k)
      return
    fn = jax.jit(functools.partial(_activations_fn, self.model, self.plan, k, s.train))
    xs = jax.device_get(self._call(fn, *args))
    ranks = calibration.calibrated_ranks(self.plan.decomposition, self.plan.sites, xs)
    if ranks:
      self.plan = plan_lib.with_ranks(self.model, self.plan, ranks)
      self.ranks.update(ranks)
    self._calibrated.add(k)

  # --------------------------------------------------------------- backward
  def backward(self, tag: int, k: int, drs: Mapping, dloss):
    """VJP of trusted stage ``k``; returns ``(dyr, dparams_k)`` for the accelerator."""
    s = self._step(tag)
    if k in s.grads:
      out = s.grads[k]
      if k == 0:
        self.end(tag)
      return out
    if k not in s.vjps:
      raise ExecutorError(f"step {tag}: backward of stage {k} before its forward")
    last = self.model.num_stages - 1
    if k < last and k + 1 not in s.dpriv:
      raise ExecutorError(f"step {tag}: backward of stage {k} before stage {k + 1}")
    dpriv_out = (s.dpriv[k + 1] if k < last else
                 jax.tree_util.tree_map(jnp.zeros_like, s.priv[k + 1]))
    rs, loss, _, _ = s.outputs[k]
    drs = {name: jnp.asarray(drs[name], rs[name].dtype) for name in rs}
    dl = None if loss is None else jnp.asarray(dloss, loss.dtype).reshape(())
    dyr, dparams, dpriv_in = self._call(_apply_vjp, s.vjps[k], s.yl_vjps.pop(k, None),
                                        (drs, dpriv_out, dl))
    if self.overlap:  # group k-1's split kernels came with stage k-1: their gradient goes back there
      dparams, s.dearly[k] = st.split_boundary_grads(self.model, self.plan, k, dparams,
                                                     s.dearly.pop(k + 1, {}))
    s.dpriv[k] = dpriv_in
    del s.vjps[k]
    s.dpriv.pop(k + 1, None)
    s.grads[k] = (dyr, dparams)
    if k == 0:
      self.end(tag)
    return dyr, dparams


def _add_kernel_grads(dparams: dict, dkernels: Mapping) -> dict:
  convs = {name: (dict(g, kernel=g["kernel"] + dkernels[name]) if name in dkernels else g)
           for name, g in dparams["convs"].items()}
  return dict(dparams, convs=convs)


def to_numpy(tree):
  """Host copies of a pytree of arrays (what a callback hands back to XLA)."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x), tree)

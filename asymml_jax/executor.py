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
idempotent for a repeated ``(tag, stage)``; a step's state is dropped when the
backward of stage 0 is done (or :meth:`end` is called).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from asymml_jax import integrity
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


def _stage_fn(model, plan, k, train, yr, params_k, stats_k, priv_in, batch, key):
  def f(yr, params_k, priv_in):
    outs, aux = st.trusted_stage(model, plan, k, params_k, stats_k, yr, priv_in,
                                 batch, key, train)
    return outs, aux
  if not train:
    return f(yr, params_k, priv_in)
  outs, vjp, aux = jax.vjp(f, yr, params_k, priv_in, has_aux=True)
  return outs, aux, vjp


@jax.jit
def _apply_vjp(vjp, cotangents):
  return vjp(cotangents)


class TrustedExecutor:
  """Runs trusted stages for the untrusted program (see module docstring).

  Args:
    model: the staged model.
    plan: per-site modes.
    key: the trusted RNG key (decomposition start blocks, later noise); each
      step uses ``fold_in(key, step)``.
  """

  def __init__(self, model: StagedModel, plan: Plan, key: jax.Array):
    self.model, self.plan, self._key = model, plan, key
    self._steps: dict[int, _Step] = {}
    self._jitted: dict[tuple[int, bool], Any] = {}

  # ------------------------------------------------------------------ steps
  def begin(self, tag: int, batch: Mapping[str, Any], *, train: bool) -> None:
    """Starts step ``tag`` on ``batch`` (image, label, mask). Idempotent."""
    tag = int(tag)
    if tag in self._steps:
      return
    self.model.check_input(batch["image"])
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    self._steps[tag] = _Step(batch=b, train=train)
    self._steps[tag].priv[0] = st.empty_private()

  def end(self, tag: int) -> None:
    self._steps.pop(int(tag), None)

  @property
  def open_steps(self) -> tuple[int, ...]:
    return tuple(self._steps)

  def _step(self, tag: int) -> _Step:
    try:
      return self._steps[int(tag)]
    except KeyError:
      raise ExecutorError(f"unknown step {tag}: begin() was not called or it has ended") from None

  def _fn(self, k: int, train: bool):
    if (k, train) not in self._jitted:
      self._jitted[(k, train)] = jax.jit(functools.partial(
          _stage_fn, self.model, self.plan, k, train))
    return self._jitted[(k, train)]

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
    res = self._call(self._fn(k, s.train), yr, params_k, stats_k, s.priv[k], s.batch, key)
    if s.train:
      (rs, priv_out, loss), (new_stats, metrics), vjp = res
      s.vjps[k] = vjp
    else:
      (rs, priv_out, loss), (new_stats, metrics) = res
    s.priv[k + 1] = priv_out
    s.outputs[k] = (rs, loss, metrics, new_stats)
    if not s.train and k == self.model.num_stages - 1:
      out = s.outputs[k]
      self.end(tag)
      return out
    return s.outputs[k]

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
    dl = None if loss is None else jnp.asarray(dloss, jnp.float32).reshape(())
    dyr, dparams, dpriv_in = self._call(_apply_vjp, s.vjps[k], (drs, dpriv_out, dl))
    s.dpriv[k] = dpriv_in
    del s.vjps[k]
    s.dpriv.pop(k + 1, None)
    s.grads[k] = (dyr, dparams)
    if k == 0:
      self.end(tag)
    return dyr, dparams


def to_numpy(tree):
  """Host copies of a pytree of arrays (what a callback hands back to XLA)."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x), tree)

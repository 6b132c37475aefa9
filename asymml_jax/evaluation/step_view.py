"""What the untrusted side sees in one training step (DESIGN sections 2, 3 and 7).

The leakage measurements of DESIGN section 7 ("Empirical leakage") need the
tensors that cross the trust boundary, exactly as they cross, for each example
of a data set.  This module extracts them from the very program every backend
runs (:func:`asymml_jax.stages.run_untrusted` with the trusted stages of
:func:`asymml_jax.stages.trusted_stage` traced inline, as the ``dense`` and
``inline`` backends do), without re-implementing any of it:

* ``activation_residual``: what each trusted stage hands to the accelerator for
  every site it produces that is not fully trusted (the ``rs`` of
  :func:`~asymml_jax.stages.trusted_stage`).  Under a split plan that is the
  residual ``R = X - U U^T X``, or ``clip_c(R) + N(0, (sigma c)^2 I)`` in DP
  mode; under a dense plan (the GPU-only baseline, where nothing is trusted)
  it is the full activation ``X``.  Keyed by site.
* ``output_gradient_residual`` (split convolution, ``gradient_protection =
  'decompose'``) or ``output_gradient`` (dense plan, or protection ``'none'``):
  the cotangent the accelerator receives for its convolution output
  ``Y_R = conv(R, W)``: ``dY_R`` (clipped and noised in DP mode) or the full
  ``dY``.  It is read off as the gradient of the loss with respect to a zero
  *probe* added to each accelerator output (``Y_R + 0``), which leaves the
  computation unchanged and receives exactly the cotangent that
  :func:`asymml_jax.privacy.gradients.protect_output` releases.  Keyed by conv.
* ``weight_gradient``: the gradient of every parameter that the untrusted
  optimizer applies, i.e. the declared ``trusted_weight_gradient`` aggregate
  (the enclave's share ``corr(X_L, dY) + corr(R, dY_L)``, normalisation and
  head gradients) plus the accelerator's own ``corr(R, dY_R)``.  For a batch
  it is the *aggregate* over the batch (AsymML does not hide it; DESIGN
  section 2, ledger class ``trusted_weight_gradient``: "not covered by
  epsilon"); for a batch of one it is that example's gradient.  Keyed by
  parameter path (``convs/conv1/kernel``, ``stages/3/GroupNorm_0/scale``...).

The scalar aggregates that also cross (``loss``, ``metrics``) are not part of
the view; nor are the tensors the enclave *receives* (``conv_output_residual``,
``residual_gradient``), which are functions of the released ones.
:data:`VIEW_LEDGER` maps each view class to its boundary-ledger class
(:mod:`enclave_bridge.ledger`).

Per example (:func:`per_example_view_fn`): the view of a batch of one,
``vmap``-ed over examples, each with its own step key.  Under the per-sample
mechanisms of DP mode (GroupNorm, per-sample subspaces, per-sample noise
streams, the loss divided by the *expected* batch size ``plan.
expected_batch_size``) an example's residuals and output-gradient residuals do
not depend on the other examples of its batch, so the batch-of-one view is
exactly what that example contributes to a real step; its weight gradient is
what the untrusted side would hold if the batch contained that example alone
(the worst case of the aggregate).

Randomness (DESIGN section 11): the caller passes the key; there is no default.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from asymml_jax import stages
from asymml_jax.models.base import StagedModel
from asymml_jax.plan import Plan

Tree = Any
View = dict[str, dict[str, jax.Array]]

ACTIVATION = "activation_residual"
OUTPUT_GRADIENT_RESIDUAL = "output_gradient_residual"
OUTPUT_GRADIENT = "output_gradient"
WEIGHT_GRADIENT = "weight_gradient"

#: View class -> boundary-ledger class (``enclave_bridge.ledger.LEDGER``) it is
#: (for the weight gradient: it contains) what crosses as.
VIEW_LEDGER: dict[str, str] = {
    ACTIVATION: "activation_residual",
    OUTPUT_GRADIENT_RESIDUAL: "output_gradient_residual",
    OUTPUT_GRADIENT: "output_gradient",
    WEIGHT_GRADIENT: "trusted_weight_gradient",
}


def gradient_class(plan: Plan, site: str) -> str:
  """The class of the output gradient of a conv reading ``site``, or ``''`` if none leaves.

  ``output_gradient_residual`` for a split site under gradient protection,
  ``output_gradient`` for a split site without it and for a dense site;
  ``''`` for a fully trusted site (the whole convolution runs in the TEE).
  """
  sp = plan.sites[site]
  if sp.mode == "trusted":
    return ""
  if sp.split and plan.protects_gradients:
    return OUTPUT_GRADIENT_RESIDUAL
  return OUTPUT_GRADIENT


def exposed_convs(model: StagedModel, plan: Plan) -> tuple[str, ...]:
  """Convolutions whose input leaves the TEE (the accelerator computes ``conv(R, W)``)."""
  return tuple(c.name for c in model.convs.values() if plan.sites[c.site].mode != "trusted")


def _flatten_tree(tree: Tree) -> dict[str, jax.Array]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in leaves:
    out["/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)] = leaf
  return out


class _RecordingHook(stages.InlineHook):
  """:class:`asymml_jax.stages.InlineHook` that also keeps every stage's ``rs``."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.released: dict[str, jax.Array] = {}

  def __call__(self, k, yr, params_k, stats_k):
    rs, loss, metrics, st = super().__call__(k, yr, params_k, stats_k)
    self.released.update(rs)
    return rs, loss, metrics, st


def untrusted_view(model: StagedModel, plan: Plan, params: Tree, stats: Tree,
                   batch: Mapping[str, jax.Array], key: jax.Array, step=0, *,
                   weight_gradient: bool = True) -> View:
  """Every per-example tensor the untrusted side sees in one training step.

  Runs one training step of the inline program (:func:`asymml_jax.stages.
  inline_loss`'s computation: same hook, same key derivation ``step_key(key,
  step)``) and returns what crossed (module docstring).  Jittable.

  Args:
    model: the staged model.
    plan: per-site modes, ranks and release settings (``plan.privacy`` with a
      fixed noise multiplier; ``plan.expected_batch_size`` as training uses).
    params: public weights ``{'convs', 'stages'}``.
    stats: batch statistics ``{'stages'}``.
    batch: ``image (B, H, W, C)``, ``label (B,)``, ``mask (B,)``.
    key: the run's trusted key (required); the step uses ``step_key(key, step)``.
    step: the step number.
    weight_gradient: include the ``weight_gradient`` class.

  Returns:
    ``{class: {name: array}}``: ``activation_residual`` by site ``(B, h, w, c)``;
    ``output_gradient_residual`` and/or ``output_gradient`` by conv
    ``(B, ho, wo, cout)``; ``weight_gradient`` by parameter path (batch
    aggregate).  Classes with no tensor are omitted.

  Raises:
    ValueError: for a missing key or a malformed batch.
  """
  if key is None:
    raise ValueError("a key is required (subspace starts and release noise)")
  model.check_input(batch["image"])
  convs = exposed_convs(model, plan)
  b = batch["image"].shape[0]
  site_shapes = model.site_shapes
  probes = {}
  for name in convs:
    c = model.convs[name]
    ho, wo = c.output_hw(*site_shapes[c.site][:2])
    probes[name] = jnp.zeros((b, ho, wo, c.features), jnp.float32)

  def loss_fn(p, pr):
    def group(model_, plan_, k, conv_params, rs, residual_dtype=None):
      out = stages.untrusted_group(model_, plan_, k, conv_params, rs, residual_dtype)
      return {n: y + pr[n].astype(y.dtype) for n, y in out.items()}

    hook = _RecordingHook(model, plan, batch, stages.step_key(key, step), True)
    loss, _ = stages.run_untrusted(model, plan, p, stats, hook, group=group)
    return loss, hook.released

  (_, released), (dparams, dprobes) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(params, probes)
  view: View = {ACTIVATION: dict(released)}
  for name in convs:
    cls = gradient_class(plan, model.convs[name].site)
    view.setdefault(cls, {})[name] = dprobes[name]
  if weight_gradient:
    view[WEIGHT_GRADIENT] = _flatten_tree(dparams)
  return {cls: v for cls, v in view.items() if v}


def per_example_view_fn(model: StagedModel, plan: Plan, *,
                        weight_gradient: bool = True) -> Callable[..., View]:
  """A jitted ``f(params, stats, images, labels, keys) -> view`` of batches of one.

  Example ``i`` of ``images (n, H, W, C)`` is run as a batch of one (mask 1)
  with the trusted key ``keys[i]`` (step 0), ``vmap``-ed over ``i``; every
  array of the returned view has a leading axis ``n`` and no batch axis
  (``(n, h, w, c)``; weight gradients ``(n, *param_shape)``: one per example).
  Use distinct keys per example (e.g. ``fold_in(key, example_id)``): batches
  of one with the same key would share their noise.

  Args:
    model: the staged model.
    plan: the plan (``batch_size`` is not used; ``expected_batch_size`` sets the
      loss denominator, as in training).
    weight_gradient: include per-example weight gradients.

  Returns:
    The jitted function.
  """

  def one(params, stats, image, label, key):
    batch = {"image": image[None], "label": label[None],
             "mask": jnp.ones((1,), jnp.float32)}
    view = untrusted_view(model, plan, params, stats, batch, key,
                          weight_gradient=weight_gradient)
    return {cls: {n: (a if cls == WEIGHT_GRADIENT else a[0]) for n, a in v.items()}
            for cls, v in view.items()}

  return jax.jit(jax.vmap(one, in_axes=(None, None, 0, 0, 0)))


__all__ = [
    "ACTIVATION", "OUTPUT_GRADIENT", "OUTPUT_GRADIENT_RESIDUAL", "VIEW_LEDGER",
    "WEIGHT_GRADIENT", "exposed_convs", "gradient_class", "per_example_view_fn",
    "untrusted_view",
]

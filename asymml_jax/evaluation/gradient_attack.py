"""Gradient-inversion attack on what the untrusted side receives in one training step.

DESIGN section 7 ("Empirical leakage") asks for "a gradient-inversion attack
on what the untrusted side sees ... reported against the dense (GPU-only)
exposure".  This module is that attack, as a library: gradient matching in
the style of "Deep Leakage from Gradients" (DLG, Zhu, Liu, Han 2019) with the
choices of "Inverting Gradients" (Geiping, Bauermeister, Droege, Moeller
2020): a cosine-similarity distance, a total-variation prior, Adam on signed
gradients with a step decay, and a box constraint.

**What the untrusted side receives in one step** (:func:`observe`), per
configuration, read off the very program the backends run by
:func:`asymml_jax.evaluation.step_view.untrusted_view`
(:func:`asymml_jax.stages.run_untrusted` with the trusted stages traced
inline, the ``dense`` / ``inline`` backends' program), so it is exactly what
crosses:

* **dense** (GPU-only baseline, ``force='dense'``): every activation ``X`` at
  every site, the raw image included (``s0``), every full output gradient
  ``dY``, and it computes the whole weight gradient of the batch itself.
* **AsymML** (per-sample split plan, ``gradient_protection='decompose'``), per
  step, for every split site and every convolution reading one (boundary
  ledger, :data:`enclave_bridge.ledger.LEDGER`):

  - ``activation_residual``: ``R = X - U U^T X`` (forward; in DP mode
    ``clip_c(R) + N(0, (sigma c)^2 I)``, DESIGN section 7);
  - ``output_gradient_residual``: ``dY_R = dY - Q Q^T dY`` (backward; in DP
    mode ``clip_{grad_clip}(dY_R) + N(0, (sigma grad_clip)^2 I)``);
  - ``trusted_weight_gradient``: the enclave's share of every parameter's
    gradient, summed over the batch and *not noised*: for a split conv
    ``corr(X_L, dY) + corr(R, dY_L)``; for a fully trusted conv (the first
    conv of a grayscale network) ``corr(X, dY)``; for the normalisation and
    head parameters their whole gradient.  The untrusted program adds it to
    its own ``corr(R, dY_R)`` (the VJP of its ``conv(R, W)``): JAX sums the
    cotangents of ``params['convs']`` that reach the kernel through the
    untrusted group and through the trusted stage
    (:class:`asymml_jax.backends.CallbackHook` returns the enclave's share as
    the cotangent of ``params_k``).  So the untrusted side ends up holding the
    **whole weight gradient of the batch**, ``sum_b dL_b/dW`` (the very
    tensor its optimizer applies), for every parameter.  With noise off it
    equals the dense model's gradient (DESIGN section 1's invariant; tested to
    ``1e-4``); in DP mode it is the gradient of the network whose releases
    were noised (the noise enters through ``R`` and ``dY_R``; the aggregate
    itself is not noised and epsilon does not cover it, as the ledger says).

  It also receives the batch loss and aggregate metrics (scalars, unused here).

**Observation channels** (:data:`CHANNELS`, the attacker matches one or
both):

* ``weight_gradient``: the whole weight gradient above, matched with Geiping et
  al.'s cosine distance (their eq. 4, one cosine over all parameters):
  ``1 - <g(x'), g*> / (||g(x')|| ||g*||)``;
* ``residuals``: every released activation residual and output-gradient
  residual, matched per tensor with a symmetric relative squared error
  (:func:`residual_distance`; the ``dY_R`` terms weighted by
  ``output_gradient_weight``).  It pins the scale (a cosine would not) and,
  under DP, is up to constants the Gaussian log-likelihood of the noisy
  release (the clipped simulated release has the fixed norm ``c``);
* ``both``: the sum of the two distances (``residual_weight`` on the second).

**The attacker** knows the architecture, the weights and the privacy
settings (public, DESIGN section 2) and simulates the step on a dummy image
``x'`` with the same program (:func:`surrogate_plan`: the victim's plan with
the noise multiplier set to 0, clipping kept: the noise is unknown to it and
has mean zero), its own key for the subspace-iteration starts, and
differentiates the distance through it (second-order autodiff through the
trusted stages, :func:`asymml_jax.privacy.gradients.protect_output`
included).  Without clipping the principal channels ``U`` do not change the
function (``X_L + R = X``) and the mechanism's stop-gradient on ``U`` is
exact; with clipping (DP) the function depends on ``U``, and the surrogate is
traced under :func:`differentiable_subspaces` so that the attacker's
derivative sees ``U`` move with ``x'`` (while the simulated step's own weight
gradient still treats ``U`` as a constant, as the mechanism does).
Objective (Geiping et al. eq. 4 with their TV prior):

    x* = argmin_{x' in [low, high]^n}  w_g D_g(x') + w_r D_r(x') + alpha TV(x')

with Adam on ``sign(grad)`` ("signed" gradients), the learning rate divided
by 10 at 3/8, 5/8 and 7/8 of the steps, ``x'`` clipped to the pixel range
(known to the attacker) after every step, and optionally several random
starts of which the best-matching one is kept.  For a batch, the order of
the reconstructions is not identifiable from a sum: each is assigned to one
original by a minimum-MSE matching (:func:`align_batch`) before scoring.  **Labels are assumed known** (the
attacker's best case; the default).  ``labels='recovered'`` instead reads
them off the head's bias gradient (iDLG, Zhao, Mopuri, Bilen 2020: for a
single image and softmax cross-entropy ``dL/db_j = p_j - y_j`` is negative
only at the true label; for ``B > 1`` the ``B`` most negative entries, which
assumes distinct labels, Yin et al. 2021), and :func:`label_recovery_accuracy`
reports how often that works on the observed aggregate.

Randomness (DESIGN section 11): every function that draws takes a JAX key;
there is no default key.  :func:`run_gradient_attack` derives the victim's
trusted step key (subspace starts and release noise of the observed step),
the attacker's surrogate key and the dummy-image key from its key with
``fold_in`` and fixed stream ids.

References:
  L. Zhu, Z. Liu, S. Han, "Deep leakage from gradients", NeurIPS 2019.
  J. Geiping, H. Bauermeister, H. Droege, M. Moeller, "Inverting gradients:
  how easy is it to break privacy in federated learning?", NeurIPS 2020
  (eq. 4: cosine distance + total variation; Adam on signed gradients, step
  decay, box constraint).
  B. Zhao, K. R. Mopuri, H. Bilen, "iDLG: improved deep leakage from
  gradients", arXiv 2001.02610, 2020 (label recovery).
  H. Yin, A. Mallya, A. Vahdat, J. M. Alvarez, J. Kautz, P. Molchanov,
  "See through gradients: image batch recovery via GradInversion", CVPR 2021
  (batch label recovery from the last layer's gradient).
  Niu, Ali, Avestimehr, "3LegRace: Privacy-preserving DNN training over TEEs
  and GPUs", PETS 2022 (the exposure).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asymml_jax import decomposition as dec
from asymml_jax import plan as plan_lib
from asymml_jax.evaluation import inversion
from asymml_jax.evaluation import step_view
from asymml_jax.models.base import StagedModel

Tree = Any

CHANNELS: tuple[str, ...] = ("weight_gradient", "residuals", "both")
LABEL_MODES: tuple[str, ...] = ("known", "recovered")
# Key streams of :func:`run_gradient_attack` (fold_in ids; the victim's and the
# attacker's are inversion's, so the two attacks draw alike).
VICTIM_STREAM = inversion.VICTIM_STREAM      # the TEE's key of the observed step
SURROGATE_STREAM = inversion.ATTACKER_STREAM  # the attacker's subspace starts
DUMMY_STREAM = 4                              # the dummy images' initialisation
_EPS = 1e-30


# ----------------------------------------------------------------------------
# The attack's settings.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradientAttackConfig:
  """Settings of the gradient-matching optimisation (validated).

  Attributes:
    steps: Adam steps on the dummy images.
    learning_rate: Adam's initial step size (pixel units of the normalised
      images; divided by 10 at 3/8, 5/8 and 7/8 of the steps when ``decay``).
    tv_weight: ``alpha``, weight of the total-variation prior (Geiping eq. 4).
    residual_weight: ``w_r`` of the residual distance in channel ``both``.
    output_gradient_weight: weight of each output-gradient residual ``dY_R``
      relative to each activation residual in the residual distance.
    signed: use ``sign(grad)`` as Adam's input (Geiping et al. section 4).
    decay: the step decay of the learning rate.
    labels: ``known`` (the victim's labels; the attacker's best case) or
      ``recovered`` (iDLG / Yin et al. from the head's bias gradient).
    init_scale: standard deviation of the Gaussian dummy-image start.
    restarts: dummy starts per problem; the one with the smallest final
      matching distance is kept (Geiping et al.'s "trials").
  """

  steps: int = 400
  learning_rate: float = 0.25
  tv_weight: float = 0.05
  residual_weight: float = 1.0
  output_gradient_weight: float = 0.2
  signed: bool = True
  decay: bool = True
  labels: str = "known"
  init_scale: float = 1.0
  restarts: int = 1

  def __post_init__(self):
    for name in ("steps", "restarts"):
      v = getattr(self, name)
      if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    for name, lo_open in (("learning_rate", True), ("tv_weight", False),
                          ("residual_weight", False),
                          ("output_gradient_weight", False), ("init_scale", True)):
      v = getattr(self, name)
      ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
            and (v > 0 if lo_open else v >= 0))
      if not ok:
        raise ValueError(f"{name} must be a finite number {'> 0' if lo_open else '>= 0'}, "
                         f"got {v!r}")
    for name in ("signed", "decay"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
    if self.labels not in LABEL_MODES:
      raise ValueError(f"labels must be one of {LABEL_MODES}, got {self.labels!r}")


def channel_weights(channel: str, residual_weight: float = 1.0) -> tuple[float, float]:
  """``(w_g, w_r)`` of an observation channel (:data:`CHANNELS`)."""
  if channel == "weight_gradient":
    return 1.0, 0.0
  if channel == "residuals":
    return 0.0, 1.0
  if channel == "both":
    return 1.0, float(residual_weight)
  raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")


# ----------------------------------------------------------------------------
# What the untrusted side receives.
# ----------------------------------------------------------------------------


class Observation(NamedTuple):
  """What the untrusted side holds after one training step (a pytree).

  Attributes:
    weight_gradient: the whole gradient of every parameter, summed over the
      batch, by parameter path (``convs/conv1/kernel`` ...): under AsymML its
      own ``corr(R, dY_R)`` plus the enclave's ``trusted_weight_gradient``.
    residuals: per site, the released tensor (``R``, or ``clip(R) + noise`` in
      DP mode; under a dense plan the full activation, the image at ``s0``).
    output_gradients: per untrusted convolution, the released cotangent of its
      output (``dY_R``, possibly clipped and noised; under a dense plan or
      without gradient protection the full ``dY``).
  """

  weight_gradient: dict
  residuals: dict
  output_gradients: dict


def observation_plan(model: StagedModel, exposure: inversion.Exposure, batch_size: int, *,
                     expected_batch_size: float | None = None) -> plan_lib.Plan:
  """The training plan of a configuration (:func:`inversion.exposure_plan`).

  ``expected_batch_size`` (DP training's Poisson expected batch size) makes the
  loss divide by it as training does, so that each victim's releases have the
  scale they have in a real DP step.
  """
  plan = inversion.exposure_plan(model, exposure, batch_size)
  if expected_batch_size is not None:
    plan = dataclasses.replace(plan, expected_batch_size=float(expected_batch_size))
  return plan


def surrogate_plan(plan: plan_lib.Plan) -> plan_lib.Plan:
  """The attacker's model of the mechanism: the same plan with the noise off.

  The noise is unknown to the attacker and has mean zero; clipping, ranks and
  gradient protection are public and kept.  Equal to ``plan`` when DP is off.
  """
  if not plan.privacy.enabled:
    return plan
  return dataclasses.replace(plan, privacy=dataclasses.replace(plan.privacy,
                                                               noise_multiplier=0.0))


@jax.custom_vjp
def _constant_to_inner_gradients(u: jax.Array) -> jax.Array:
  """Identity whose VJP is zero: a constant for the step's own (inner) gradients.

  The released weight gradient treats ``U`` as a constant (the mechanism's
  stop-gradient), so the surrogate's inner gradient must too; an *outer*
  derivative (the attacker's, in the dummy image) still sees ``U``'s value
  depend on its input through the forward rule (the identity).
  """
  return u


def _constant_fwd(u):
  return u, None


def _constant_bwd(_, g):
  return (jnp.zeros_like(g),)


_constant_to_inner_gradients.defvjp(_constant_fwd, _constant_bwd)


def _differentiable_decompose(x: jax.Array, key: jax.Array, r_max: int, *, tau: float = 0.0,
                              num_iters: int = 2, scope: str = "per_sample",
                              min_rank: int = 1, q0: jax.Array | None = None
                              ) -> dec.Decomposition:
  """:func:`asymml_jax.decomposition.decompose` without the stop-gradient on ``U``.

  The same algorithm from the same building blocks (random start block with
  ``OVERSAMPLE`` extra columns, :func:`~asymml_jax.decomposition.subspace_iteration`,
  :func:`~asymml_jax.decomposition.rayleigh_ritz`,
  :func:`~asymml_jax.decomposition.energy_rank`), but ``U`` stays a function
  of ``x`` for the attacker's (outer) derivative while remaining a constant
  for the simulated step's own weight gradient (as in the mechanism,
  :func:`_constant_to_inner_gradients`).  The project treats ``U`` as a
  constant because ``X_L + R = X`` makes the output independent of it; once
  ``R`` is clipped that no longer holds, and an attacker differentiating
  through the clipped mechanism needs ``dU/dx`` (without it the gradient of
  the matching distance is not even a descent direction).  Per-sample scope
  only (DP mode).
  """
  if scope != "per_sample":
    raise ValueError("the differentiable decomposition is per_sample only (DP mode)")
  b, h, w, c = x.shape
  cols = min(c, r_max + dec.OVERSAMPLE)
  if q0 is None:
    q0 = jax.random.normal(key, (b, c, cols), jnp.float32)

  def basis(x2d, q):
    q = dec.subspace_iteration(x2d, q, num_iters)
    q, energies = dec.rayleigh_ritz(x2d, q)
    q, energies = q[:, :r_max], energies[:r_max]
    rank = dec.energy_rank(energies, jnp.sum(x2d * x2d), tau, min_rank)
    return q * (jnp.arange(r_max) < rank)[None, :].astype(q.dtype), rank

  u, rank = jax.vmap(basis)(x.astype(jnp.float32).reshape(b, h * w, c), q0)
  u = _constant_to_inner_gradients(u.astype(x.dtype))
  p = dec.project(x, u)
  return dec.Decomposition(u=u, p=p, residual=x - dec.reconstruct(p, u), rank=rank)


@contextlib.contextmanager
def differentiable_subspaces(enabled: bool = True):
  """While tracing inside this block, decompositions let gradients flow through ``U``.

  Swaps :func:`asymml_jax.decomposition.decompose` (which the trusted stages
  and :mod:`asymml_jax.privacy.gradients` call through the module) for
  :func:`_differentiable_decompose`; only the attacker's surrogate is traced
  inside it (its jitted program keeps what was traced).  Not thread-safe.
  """
  if not enabled:
    yield
    return
  original = dec.decompose
  dec.decompose = _differentiable_decompose
  try:
    yield
  finally:
    dec.decompose = original


def observe(model: StagedModel, plan: plan_lib.Plan, params: Tree, stats: Tree,
            images: jax.Array, labels: jax.Array, key: jax.Array, step=0) -> Observation:
  """Everything the untrusted side receives in one training step on a batch.

  A view of :func:`asymml_jax.evaluation.step_view.untrusted_view` (the
  inline backends' program, :func:`asymml_jax.stages.run_untrusted`, with
  the released residuals recorded and each released output gradient read off
  as the cotangent of a zero added to ``Y_R``), so the weight gradient is the
  one :class:`asymml_jax.backends.InlineBackend` hands the optimizer.
  Jittable and differentiable in ``images`` (the attacker differentiates
  through it).

  Args:
    model: the staged model.
    plan: the configuration's plan (:func:`observation_plan`).
    params: public weights ``{'convs', 'stages'}``.
    stats: batch statistics ``{'stages'}``.
    images: ``(B, H, W, C)``.
    labels: ``(B,)`` int labels.
    key: the trusted RNG key (the step's key is ``step_key(key, step)``, as in
      the backends).
    step: the step number.

  Returns:
    The :class:`Observation`.
  """
  if key is None:
    raise ValueError("a key is required (subspace starts and release noise)")
  b = images.shape[0]
  batch = {"image": images, "label": labels, "mask": jnp.ones((b,), jnp.float32)}
  view = step_view.untrusted_view(model, plan, params, stats, batch, key, step)
  dys = {**view.get(step_view.OUTPUT_GRADIENT, {}),
         **view.get(step_view.OUTPUT_GRADIENT_RESIDUAL, {})}
  return Observation(weight_gradient=view[step_view.WEIGHT_GRADIENT],
                     residuals=view.get(step_view.ACTIVATION, {}), output_gradients=dys)


# ----------------------------------------------------------------------------
# Distances and the prior.
# ----------------------------------------------------------------------------


def gradient_distance(a: Tree, b: Tree) -> jax.Array:
  """Geiping et al. eq. 4's distance: ``1 - <a, b> / (||a|| ||b||)`` over all leaves."""
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  if len(la) != len(lb):
    raise ValueError(f"gradient trees differ: {len(la)} vs {len(lb)} leaves")
  dot = sum(jnp.vdot(u, v) for u, v in zip(la, lb))
  na = sum(jnp.vdot(u, u) for u in la)
  nb = sum(jnp.vdot(v, v) for v in lb)
  return 1.0 - dot / jnp.sqrt(na * nb + _EPS)


def _symmetric_relative_error(sim: jax.Array, obs: jax.Array) -> jax.Array:
  """``||sim - obs||^2 / (||sim||^2 + ||obs||^2)`` over the whole tensor, in ``[0, 2]``."""
  return jnp.sum((sim - obs) ** 2) / (jnp.sum(sim * sim) + jnp.sum(obs * obs) + _EPS)


def residual_distance(sim: Observation, obs: Observation,
                      output_gradient_weight: float = 1.0) -> jax.Array:
  """Weighted mean symmetric relative squared error over the released tensors.

  Each released tensor ``t`` (every activation residual, and every
  output-gradient residual with weight ``output_gradient_weight``)
  contributes ``||t(x') - t*||^2 / (||t(x')||^2 + ||t*||^2)``, in ``[0, 2]``
  (so that no one tensor dominates, whatever its scale), zero only at
  ``t(x') = t*``.  Unlike a cosine it pins the scale of the match; under DP
  the clipped simulated release has a fixed norm ``c``, so the numerator is,
  up to constants, the Gaussian negative log-likelihood of the noisy release.
  """
  terms = [(1.0, sim.residuals[s], obs.residuals[s]) for s in sorted(obs.residuals)]
  if output_gradient_weight > 0:
    terms += [(float(output_gradient_weight), sim.output_gradients[c],
               obs.output_gradients[c]) for c in sorted(obs.output_gradients)]
  if not terms:
    return jnp.zeros((), jnp.float32)
  total = sum(w * _symmetric_relative_error(a, b) for w, a, b in terms)
  return total / sum(w for w, _, _ in terms)


def total_variation(x: jax.Array) -> jax.Array:
  """Anisotropic TV of Geiping et al.: mean ``|dx|`` plus mean ``|dy|`` (NHWC)."""
  return (jnp.mean(jnp.abs(x[:, 1:, :, :] - x[:, :-1, :, :]))
          + jnp.mean(jnp.abs(x[:, :, 1:, :] - x[:, :, :-1, :])))


# ----------------------------------------------------------------------------
# Labels.
# ----------------------------------------------------------------------------


def head_bias_gradient(model: StagedModel, weight_gradient: Mapping[str, jax.Array]
                       ) -> jax.Array:
  """The gradient of the classifier's bias (in the last stage), ``(num_classes,)``."""
  prefix = f"stages/{model.num_stages - 1}/"
  biases = [v for k, v in weight_gradient.items()
            if k.startswith(prefix) and k.endswith("/bias") and v.shape == (model.num_classes,)]
  if len(biases) != 1:
    raise ValueError(f"expected one head bias of shape ({model.num_classes},) under "
                     f"{prefix!r}, found {len(biases)}")
  return biases[0]


def recover_labels(model: StagedModel, weight_gradient: Tree, batch_size: int) -> np.ndarray:
  """Labels read off the head's bias gradient (iDLG; Yin et al. 2021 for ``B > 1``).

  With softmax cross-entropy, ``dL/db_j = sum_b (p_bj - y_bj) / n``: for one
  image the only negative entry is the true label (iDLG); for ``B`` images
  the ``B`` most negative entries are taken (exact when the labels are
  distinct and the model is not already confident on them).

  Returns:
    ``(batch_size,)`` int32 labels, sorted (the order within a batch is not
    identifiable; the attack matches a sum over the batch).
  """
  g = np.asarray(head_bias_gradient(model, weight_gradient), np.float64)
  if not 1 <= batch_size <= len(g):
    raise ValueError(f"batch_size must be in [1, {len(g)}] to recover distinct labels")
  return np.sort(np.argsort(g, kind="stable")[:batch_size]).astype(np.int32)


def label_recovery_accuracy(recovered: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of a batch's labels recovered (as multisets: order is not identifiable)."""
  a = list(np.asarray(recovered).tolist())
  hits = 0
  for y in np.asarray(labels).tolist():
    if y in a:
      a.remove(y)
      hits += 1
  return hits / max(1, len(labels))


# ----------------------------------------------------------------------------
# The optimisation.
# ----------------------------------------------------------------------------


def learning_rate_schedule(config: GradientAttackConfig) -> optax.Schedule:
  """Geiping et al.'s step decay: ``lr / 10`` at 3/8, 5/8 and 7/8 of the steps."""
  if not config.decay:
    return optax.constant_schedule(config.learning_rate)
  n = config.steps
  return optax.piecewise_constant_schedule(
      config.learning_rate, {int(n * 3 / 8): 0.1, int(n * 5 / 8): 0.1, int(n * 7 / 8): 0.1})


class Matcher:
  """Jitted gradient matching for one model, plan and batch size.

  A *problem* is one victim batch under one observation channel: its observed
  :class:`Observation`, its labels, its channel weights ``(w_g, w_r)`` and its
  dummy images.  The channel weights are arguments of the one jitted step, so
  one compilation serves every channel and victim batch of a configuration.
  Problems run one after the other: on XLA:CPU, ``vmap`` over problems turns
  the per-problem weight gradients into grouped convolutions, several times
  slower than a loop.

  Args:
    model: the staged model.
    plan: the victim's plan (:func:`observation_plan`); the attacker simulates
      :func:`surrogate_plan` of it.
    variables: public ``{'params', 'batch_stats'}``.
    config: the :class:`GradientAttackConfig`.
    low: smallest pixel value (the box).
    high: largest pixel value.
  """

  def __init__(self, model: StagedModel, plan: plan_lib.Plan, variables: Mapping[str, Tree],
               config: GradientAttackConfig, *, low: float, high: float):
    if not high > low:
      raise ValueError(f"need high > low, got [{low}, {high}]")
    self.model, self.plan, self.config = model, plan, config
    self.surrogate = surrogate_plan(plan)
    self.low, self.high = float(low), float(high)
    params, stats = variables["params"], variables["batch_stats"]
    self.tx = optax.adam(learning_rate_schedule(config))
    surrogate, tx = self.surrogate, self.tx

    # With clipping on (DP), the released function depends on U: differentiate
    # through the subspace iteration.  Without it the stop-gradient is exact.
    through_u = surrogate.privacy.enabled

    def objective(x, labels, target, weights, key):
      with differentiable_subspaces(through_u):  # only runs while tracing
        sim = observe(model, surrogate, params, stats, x, labels, key)
      d_g = gradient_distance(sim.weight_gradient, target.weight_gradient)
      d_r = residual_distance(sim, target, config.output_gradient_weight)
      tv = total_variation(x)
      total = weights[0] * d_g + weights[1] * d_r + config.tv_weight * tv
      return total, jnp.stack([total, d_g, d_r, tv])

    def one_step(x, opt_state, labels, target, weights, key):
      (_, parts), g = jax.value_and_grad(objective, has_aux=True)(x, labels, target,
                                                                  weights, key)
      g = jnp.nan_to_num(g)  # a degenerate subspace derivative must not poison x
      if config.signed:
        g = jnp.sign(g)
      updates, opt_state = tx.update(g, opt_state, x)
      x = jnp.clip(optax.apply_updates(x, updates), low, high)
      return x, opt_state, parts

    self._observe = jax.jit(lambda x, y, k: observe(model, plan, params, stats, x, y, k))
    self._step = jax.jit(one_step)

  def observe(self, images: np.ndarray, labels: np.ndarray, key: jax.Array) -> Observation:
    """The victim's step on one batch (the real plan: noise drawn from ``key``)."""
    if key is None:
      raise ValueError("a key is required (the TEE's key of the observed step)")
    return self._observe(jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32),
                         key)

  def distances(self, x: np.ndarray, labels: np.ndarray, target: Observation,
                weights: Sequence[float], key: jax.Array) -> np.ndarray:
    """``(4,)``: total, ``D_g``, ``D_r``, TV of one problem at ``x`` (e.g. the truth)."""
    x = jnp.asarray(x, jnp.float32)
    # The step's distances are those at its input: one compiled program for both.
    _, _, parts = self._step(x, self.tx.init(x), jnp.asarray(labels, jnp.int32), target,
                             jnp.asarray(weights, jnp.float32), key)
    return np.asarray(parts)

  def run(self, target: Observation, labels: np.ndarray, weights: Sequence[float],
          key: jax.Array, init_key: jax.Array, *,
          record_every: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Optimises the dummy images of one problem.

    Args:
      target: the observation to match.
      labels: ``(B,)`` labels the attacker uses.
      weights: channel weights ``(w_g, w_r)`` (:func:`channel_weights`).
      key: the attacker's surrogate key (subspace starts).
      init_key: key of the dummy images' Gaussian start.
      record_every: steps between recorded distances.

    Returns:
      ``(reconstruction (B, H, W, C), history (T, 4))``; ``history`` holds the
      total distance, ``D_g``, ``D_r`` and TV every ``record_every`` steps and
      at the last step, at the iterate *before* that step's update.
    """
    if key is None or init_key is None:
      raise ValueError("keys are required (surrogate subspace starts, dummy initialisation)")
    labels = jnp.asarray(labels, jnp.int32)
    weights = jnp.asarray(weights, jnp.float32)
    shape = (labels.shape[0], *self.model.input_shape)
    x = jnp.clip(self.config.init_scale * jax.random.normal(init_key, shape, jnp.float32),
                 self.low, self.high)
    opt_state = self.tx.init(x)
    history = []
    for i in range(self.config.steps):
      x, opt_state, parts = self._step(x, opt_state, labels, target, weights, key)
      if i % record_every == 0 or i == self.config.steps - 1:
        history.append(parts)
    return np.asarray(x), np.stack([np.asarray(h) for h in history])


def align_batch(originals: np.ndarray, recons: np.ndarray) -> np.ndarray:
  """Reorders one batch's reconstructions to best match its originals (least total MSE).

  The weight gradient is a sum over the batch, so which dummy image ends up
  as which victim image is not identifiable; as is usual for batch
  reconstructions (Yin et al. 2021), each reconstruction is assigned to one
  original by a minimum-cost matching (Hungarian algorithm, ``scipy``).
  """
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  o = np.asarray(originals, np.float64).reshape(len(originals), -1)
  r = np.asarray(recons, np.float64).reshape(len(recons), -1)
  cost = ((o[:, None, :] - r[None, :, :]) ** 2).mean(axis=2)
  rows, cols = optimize.linear_sum_assignment(cost)
  return np.asarray(recons)[cols[np.argsort(rows)]]


# ----------------------------------------------------------------------------
# One configuration, end to end.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradientAttackResult:
  """One configuration and channel: metrics, reconstructions, the distance curve."""

  name: str
  channel: str
  metrics: dict[str, float]
  recons: np.ndarray            # (N, H, W, C) clipped, aligned reconstructions (victim order)
  history: np.ndarray           # (T, 4): mean over problems of total, D_g, D_r, TV
  distance_at_truth: list[float]  # mean over problems: total, D_g, D_r, TV at the truth
  final_distance: list[float]
  label_accuracy: float
  seconds: float                # the whole configuration (all its channels)

  def to_dict(self) -> dict[str, Any]:
    return {"name": self.name, "channel": self.channel, **self.metrics,
            "distance_curve": self.history[:, 0].tolist(),
            "final_distance": {k: v for k, v in zip(("total", "weight_gradient", "residuals",
                                                     "tv"), self.final_distance)},
            "distance_at_truth": {k: v for k, v in zip(("total", "weight_gradient",
                                                        "residuals", "tv"),
                                                       self.distance_at_truth)},
            "label_recovery_accuracy": self.label_accuracy, "seconds": self.seconds}


def run_gradient_attack(model: StagedModel, variables: Mapping[str, Tree],
                        exposure: inversion.Exposure, victim_images: np.ndarray,
                        victim_labels: np.ndarray, *, batch_size: int,
                        channels: Sequence[str], config: GradientAttackConfig,
                        key: jax.Array, low: float, high: float,
                        expected_batch_size: float | None = None,
                        log: Callable[[str], None] | None = None
                        ) -> list[GradientAttackResult]:
  """Observes one training step per victim batch and inverts it, per channel.

  The victim images are cut into ``len // batch_size`` batches (a remainder is
  dropped); each batch is one training step of the victim's configuration,
  observed with the TEE's key ``fold_in(fold_in(key, VICTIM_STREAM), i)`` for
  batch ``i``.  Every (channel, batch) problem is then optimised at once
  (:class:`Matcher`), the attacker's surrogate using
  ``fold_in(fold_in(key, SURROGATE_STREAM), i)`` and the dummy images
  ``fold_in(fold_in(fold_in(key, DUMMY_STREAM), i), t)`` for restart ``t``
  (the same starts for every channel, so channels differ only in what is
  matched); of ``config.restarts`` restarts the one with the smallest final
  distance is kept (Geiping et al.'s trials: the attacker can evaluate its
  own objective).

  Args:
    model: the staged model.
    variables: public ``{'params', 'batch_stats'}`` (:func:`inversion.public_weights`).
    exposure: the configuration (:class:`inversion.Exposure`).
    victim_images: ``(N, H, W, C)``.
    victim_labels: ``(N,)``.
    batch_size: images per observed step.
    channels: observation channels (:data:`CHANNELS`).
    config: the optimisation.
    key: JAX key (required).
    low: smallest pixel value (the box; reconstructions are clipped to it).
    high: largest pixel value.
    expected_batch_size: see :func:`observation_plan`.
    log: optional progress sink.

  Returns:
    One :class:`GradientAttackResult` per channel, in the order given.
  """
  if key is None:
    raise ValueError("a key is required")
  channels = tuple(channels)
  if not channels or any(c not in CHANNELS for c in channels) or len(set(channels)) != len(
      channels):
    raise ValueError(f"channels must be distinct names from {CHANNELS}, got {channels!r}")
  victim_images = np.asarray(victim_images, np.float32)
  victim_labels = np.asarray(victim_labels, np.int32)
  n_batches = len(victim_images) // batch_size
  if batch_size < 1 or n_batches < 1:
    raise ValueError(f"need at least one batch of {batch_size} victim images, got "
                     f"{len(victim_images)}")
  t0 = time.perf_counter()
  plan = observation_plan(model, exposure, batch_size, expected_batch_size=expected_batch_size)
  matcher = Matcher(model, plan, variables, config, low=low, high=high)
  images = victim_images[:n_batches * batch_size].reshape(n_batches, batch_size,
                                                          *victim_images.shape[1:])
  labels = victim_labels[:n_batches * batch_size].reshape(n_batches, batch_size)
  victim_key = jax.random.fold_in(key, VICTIM_STREAM)
  observed = [matcher.observe(images[i], labels[i], jax.random.fold_in(victim_key, i))
              for i in range(n_batches)]
  recovered = np.stack([recover_labels(model, o.weight_gradient, batch_size)
                        for o in observed])
  label_acc = float(np.mean([label_recovery_accuracy(recovered[i], labels[i])
                             for i in range(n_batches)]))
  attack_labels = labels if config.labels == "known" else recovered
  if log is not None:
    log(f"{exposure.name} (batch {batch_size}): observed {n_batches} steps "
        f"({time.perf_counter() - t0:.0f} s); labels {config.labels}, iDLG recovery "
        f"{label_acc:.2f}")
  surrogate_key = jax.random.fold_in(key, SURROGATE_STREAM)
  dummy_key = jax.random.fold_in(key, DUMMY_STREAM)
  recons = np.zeros((len(channels), *images.shape), np.float32)
  histories, at_truth = [], []
  for j, channel in enumerate(channels):
    weights = channel_weights(channel, config.residual_weight)
    hist_c, truth_c = [], []
    for i in range(n_batches):
      s_key = jax.random.fold_in(surrogate_key, i)
      truth_c.append(matcher.distances(images[i], attack_labels[i], observed[i], weights,
                                       s_key))
      best = None
      for t in range(config.restarts):
        init_key = jax.random.fold_in(jax.random.fold_in(dummy_key, i), t)
        rec, h = matcher.run(observed[i], attack_labels[i], weights, s_key, init_key)
        if best is None or h[-1, 0] < best[1][-1, 0]:
          best = (rec, h)
      recons[j, i], h = best
      hist_c.append(h)
    histories.append(np.stack(hist_c, axis=1))  # (T, n_batches, 4)
    at_truth.append(np.stack(truth_c))
    if log is not None:
      log(f"  {exposure.name} / {channel}: {n_batches} x {config.restarts} x {config.steps} "
          f"steps done ({time.perf_counter() - t0:.0f} s)")
  seconds = time.perf_counter() - t0
  results = []
  for j, channel in enumerate(channels):
    rec = np.clip(recons[j], low, high)
    rec = np.concatenate([align_batch(images[i], rec[i]) for i in range(n_batches)])
    m = inversion.image_metrics(images.reshape(rec.shape), rec, low=low, high=high)
    res = GradientAttackResult(
        name=exposure.name, channel=channel, metrics=m, recons=rec,
        history=histories[j].mean(axis=1), distance_at_truth=at_truth[j].mean(0).tolist(),
        final_distance=histories[j][-1].mean(0).tolist(), label_accuracy=label_acc,
        seconds=seconds)
    results.append(res)
    if log is not None:
      log(f"{exposure.name} / {channel}: SSIM {m['ssim']:.3f} (uniform-7 "
          f"{m['ssim_uniform7']:.3f}), PSNR {m['psnr']:.2f} dB on {m['n']} images; "
          f"distance {res.final_distance[0]:.3f} (at the truth "
          f"{res.distance_at_truth[0]:.3f}); {seconds:.0f} s")
  return results


__all__ = [
    "CHANNELS", "GradientAttackConfig", "GradientAttackResult", "LABEL_MODES", "Matcher",
    "Observation", "align_batch", "channel_weights", "gradient_distance", "head_bias_gradient",
    "label_recovery_accuracy", "learning_rate_schedule", "observation_plan", "observe",
    "recover_labels", "residual_distance", "run_gradient_attack",
    "surrogate_plan", "total_variation",
]

"""The trusted stage function and the untrusted convolution group of a staged model.

One training or inference step alternates (DESIGN section 3, "Forward, one stage"):

* trusted stage ``k`` (:func:`trusted_stage`): add ``Y_R`` (from the
  accelerator), the low-rank part ``conv(P, W')`` and the bias of every
  convolution of group ``k-1``; run the stage module (normalisation, ReLU,
  pooling, shortcuts; the head and the loss in the last stage); decompose the
  activations that group ``k`` reads, keeping ``P`` and ``U`` private and
  releasing the residuals ``R``;
* untrusted group ``k`` (:func:`untrusted_group`): ``Y_R = conv(R, W)``.

:func:`run_untrusted` is the untrusted program: it owns the public weights and
calls a *trusted-stage hook* for every stage.  Every backend is this program
with a different hook: traced inline (``dense``, ``inline``), a host callback
into an in-process executor (``local``), or the enclave process (``enclave``).
Private state (``P``, ``U``, shortcuts, images, labels) only ever lives in the
hook, never in the untrusted program.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from asymml_jax import decomposition as dec
from asymml_jax import integrity
from asymml_jax import ops, precision
from asymml_jax.models.base import StagedModel
from asymml_jax.plan import Plan
from asymml_jax.privacy import gradients as grad_lib
from asymml_jax.privacy import noise as noise_lib

Tree = Any
# hook(k, yr, params_k, stats_k) -> (rs, loss | None, metrics | None, new_stats_k)
TrustedHook = Callable[[int, dict, dict, dict], tuple[dict, Any, Any, dict]]


def empty_private() -> dict:
  """Private state carried between trusted stages.

  ``carry`` (shortcuts), and per site: ``x`` (activations of fully trusted
  convs), ``p``/``u`` (principal channels), ``r`` (the released residual,
  kept in training for the TEE's share of the weight gradient under gradient
  protection, and for the integrity checks) and ``probe`` (the backward integrity check's
  channel between the stage that released a residual and its readers,
  :func:`asymml_jax.integrity.watch_residual`).
  """
  return {"carry": {}, "x": {}, "p": {}, "u": {}, "r": {}, "probe": {}}


# Key streams of one step (DESIGN section 11): site ``i`` decomposes with
# ``fold_in(key, i)`` and noises its release with ``fold_in(fold_in(key, i),
# ACTIVATION_NOISE)``; conv ``j``'s output gradient uses
# ``fold_in(fold_in(key, GRADIENT_STREAM), j)``; the integrity checks (forward:
# conv ``j``; backward: site ``i``) use ``fold_in(fold_in(fold_in(key,
# INTEGRITY_STREAM), direction), index)``.
ACTIVATION_NOISE = 1
GRADIENT_STREAM = 0x67726164  # "grad": far above any site index
INTEGRITY_STREAM = 0x76657269  # "veri"


def site_key(key: jax.Array, index: int) -> jax.Array:
  """Key of site ``index``'s subspace start block."""
  return jax.random.fold_in(key, index)


def release_noise_key(key: jax.Array, index: int) -> jax.Array:
  """Key of site ``index``'s release noise (never the decomposition's key)."""
  return jax.random.fold_in(site_key(key, index), ACTIVATION_NOISE)


def gradient_key(key: jax.Array, conv_index: int) -> jax.Array:
  """Key of conv ``conv_index``'s output-gradient decomposition and noise."""
  return jax.random.fold_in(jax.random.fold_in(key, GRADIENT_STREAM), conv_index)


def integrity_key(key: jax.Array, index: int, direction: str) -> jax.Array:
  """Key of an integrity check's signs: conv ``index`` (forward) or site ``index`` (backward)."""
  d = integrity.DIRECTIONS.index(direction)
  return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, INTEGRITY_STREAM), d),
                            index)


def release_residual(plan: Plan, residual: jax.Array, key: jax.Array, index: int) -> jax.Array:
  """What site ``index`` releases: ``R``, or ``clip(R) + noise`` in DP mode (section 7)."""
  pc = plan.privacy
  if not pc.enabled:
    return residual
  return noise_lib.clip_and_noise(residual, release_noise_key(key, index), clip=pc.clip,
                                  noise_multiplier=pc.noise_multiplier)


def gradient_release(model: StagedModel, plan: Plan, conv) -> grad_lib.GradientRelease:
  """Static settings of conv ``conv``'s protected output gradient."""
  cfg, pc = plan.decomposition, plan.privacy
  return grad_lib.GradientRelease(
      spec=conv, r_max=cfg.r_max(conv.features), tau=cfg.tau, num_iters=cfg.num_iters,
      min_rank=cfg.min_rank, clip=pc.grad_clip if pc.enabled else None,
      noise_multiplier=pc.noise_multiplier if pc.enabled else 0.0)


def stage_params(model: StagedModel, params: Tree, k: int) -> dict:
  """Public parameters trusted stage ``k`` needs: group ``k-1``'s convs and its module."""
  convs = ({c.name: params["convs"][c.name] for c in model.groups[k - 1]}
           if k > 0 else {})
  return {"convs": convs, "stage": params["stages"][str(k)]}


def split_convs(model: StagedModel, plan: Plan, k: int) -> list:
  """Group ``k``'s convolutions whose input site is split (a low-rank part in the TEE)."""
  if not 0 <= k < len(model.groups):
    return []
  return [c for c in model.groups[k] if plan.sites[c.site].split]


def boundary_params(model: StagedModel, plan: Plan, params: Tree, k: int) -> dict:
  """Stage ``k``'s public parameters as a host call carries them (overlap layout).

  DESIGN section 3, step 3: the TEE computes ``Y_L = conv(P, W')`` while the
  accelerator computes ``Y_R``, so the kernels of group ``k``'s split
  convolutions travel one call early, with stage ``k`` (``"next"``), and
  stage ``k+1``'s call carries the rest of group ``k``'s parameters (biases,
  the kernels of trusted and dense convolutions).  Every weight crosses once
  per step, as in :func:`stage_params`; :func:`merge_boundary` restores that
  layout on the trusted side.
  """
  pk = stage_params(model, params, k)
  nxt = {c.name: params["convs"][c.name]["kernel"] for c in split_convs(model, plan, k)}
  return {"convs": _without_early_kernels(model, plan, k, pk["convs"]), "stage": pk["stage"],
          "next": nxt}


def _without_early_kernels(model: StagedModel, plan: Plan, k: int, convs: Mapping) -> dict:
  """Group ``k-1``'s conv entries less the split kernels that travelled with stage ``k-1``."""
  early = {c.name for c in split_convs(model, plan, k - 1)}
  return {name: {n: v for n, v in p.items() if not (name in early and n == "kernel")}
          for name, p in convs.items()}


def merge_boundary(boundary_k: Mapping, early_kernels: Mapping) -> dict:
  """:func:`stage_params` of stage ``k`` from its :func:`boundary_params` and the
  kernels stage ``k-1``'s call carried (``boundary_params(..., k - 1)["next"]``)."""
  convs = {name: (dict(p, kernel=early_kernels[name]) if name in early_kernels else dict(p))
           for name, p in boundary_k["convs"].items()}
  return {"convs": convs, "stage": boundary_k["stage"]}


def split_boundary_grads(model: StagedModel, plan: Plan, k: int, dparams_k: Mapping,
                         dnext: Mapping) -> tuple[dict, dict]:
  """The inverse of :func:`merge_boundary` for cotangents.

  Returns:
    ``(dboundary_k, dearly)``: the cotangent of stage ``k``'s boundary
    parameters (``"next"`` is ``dnext``, the gradient of group ``k``'s split
    kernels that stage ``k+1``'s backward produced) and the gradient of the
    kernels stage ``k-1``'s call carried, which stage ``k-1``'s backward returns.
  """
  dearly = {c.name: dparams_k["convs"][c.name]["kernel"]
            for c in split_convs(model, plan, k - 1)}
  return ({"convs": _without_early_kernels(model, plan, k, dparams_k["convs"]),
           "stage": dparams_k["stage"], "next": dict(dnext)}, dearly)


def lowrank_outputs(model: StagedModel, plan: Plan, k: int, kernels: Mapping,
                    priv_in: Mapping) -> dict:
  """``Y_L = conv(P, W')`` of every split conv of group ``k-1`` (section 3, step 3).

  Needs only the private ``P``/``U`` stage ``k-1`` left and the kernels, not
  the accelerator's ``Y_R``: the enclave computes it while the accelerator
  convolves the residuals, and hands it to :func:`trusted_stage` as ``yl``.
  """
  return {c.name: ops.lowrank_conv(priv_in["p"][c.site], priv_in["u"][c.site],
                                   kernels[c.name], c)
          for c in split_convs(model, plan, k - 1)}


def stage_stats(stats: Tree, k: int) -> dict:
  return stats["stages"][str(k)]


def step_key(key: jax.Array, step) -> jax.Array:
  """The trusted RNG key of one step: ``fold_in(key, step)`` (DESIGN section 11)."""
  return jax.random.fold_in(key, jnp.asarray(step, jnp.int32))


def classification_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                        denominator: float | None = None) -> tuple[jax.Array, dict]:
  """Masked mean softmax cross-entropy and aggregate metrics (trusted, last stage).

  ``denominator`` (the expected batch size under Poisson sampling) replaces the
  realised count, so one example's loss gradient does not depend on the others.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  count = jnp.sum(mask)
  denom = (jnp.maximum(count, 1.0) if denominator is None
           else jnp.asarray(denominator, ce.dtype))
  loss = jnp.sum(ce * mask) / denom
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
  return loss, {"loss_sum": jnp.sum(ce * mask), "correct": correct, "count": count}


def trusted_stage(model: StagedModel, plan: Plan, k: int, params_k: dict,
                  stats_k: dict, yr: Mapping[str, jax.Array], priv_in: dict,
                  batch: Mapping[str, jax.Array], key: jax.Array, train: bool,
                  yl: Mapping[str, jax.Array] | None = None):
  """Trusted stage ``k`` as one pure function (DESIGN section 3, steps 3-5 and 1).

  Releases follow ``plan.privacy`` (DESIGN section 7): residuals are clipped
  and noised when DP is on, and with gradient protection each split conv's
  ``Y_R`` passes through :func:`asymml_jax.privacy.gradients.protect_output`,
  so the backward pass releases only ``dY_R``.

  With ``plan.verify_untrusted`` every ``Y_R`` received is checked against the
  ``R`` this side released (:func:`asymml_jax.integrity.check_conv`), and in
  training every residual gradient the accelerator returns for a released
  ``R`` is checked in this function's VJP (:func:`asymml_jax.integrity.watch_residual`,
  :func:`asymml_jax.integrity.tap_output`); a failure raises
  :class:`asymml_jax.integrity.IntegrityError` (see :func:`asymml_jax.integrity.typed_errors`).

  Args:
    model: the staged model.
    plan: per-site modes and ranks.
    k: stage index.
    params_k: :func:`stage_params` of stage ``k``.
    stats_k: batch statistics of stage ``k``.
    yr: ``conv(R, W)`` for each non-trusted conv of group ``k-1``, from the accelerator.
    priv_in: private state from stage ``k-1`` (:func:`empty_private` layout).
    batch: ``image`` (used by stage 0), ``label`` and ``mask`` (last stage).
    key: the step's trusted key; sites and output gradients derive theirs from
      it (:func:`site_key`, :func:`release_noise_key`, :func:`gradient_key`).
    train: training mode (BatchNorm uses batch statistics).
    yl: the low-rank outputs :func:`lowrank_outputs` computed ahead (overlap);
      ``None`` computes them here.

  Returns:
    ``((rs, priv_out, loss), (new_stats_k, metrics))``: residuals released to the
    accelerator, private state for stage ``k+1``, the loss (last stage only,
    else ``None``), updated batch statistics and aggregate metrics.
  """
  ys = combine_outputs(model, plan, k, params_k, yr, priv_in, key, train, yl)
  xs, carry, new_stats = apply_module(model, k, params_k, stats_k, ys, priv_in, batch, train)
  if k == model.num_stages - 1:
    loss, metrics = classification_loss(xs["logits"], batch["label"], batch["mask"],
                                        plan.expected_batch_size)
    return ({}, empty_private(), loss), (new_stats, metrics)
  rs, priv_out = release(plan, k, xs, key, train)
  priv_out["carry"] = carry
  return (rs, priv_out, None), (new_stats, None)


def combine_outputs(model: StagedModel, plan: Plan, k: int, params_k: dict,
                    yr: Mapping[str, jax.Array], priv_in: dict, key: jax.Array, train: bool,
                    yl: Mapping[str, jax.Array] | None = None) -> dict:
  """Step "combine" of stage ``k``: ``Y = Y_R + conv(P, W') + b`` per conv of group ``k-1``.

  DESIGN section 3, step 3.  Fully trusted convs run here on the kept ``X``;
  with ``plan.verify_untrusted`` every ``Y_R`` is checked first, and with
  gradient protection it passes through
  :func:`asymml_jax.privacy.gradients.protect_output`.
  """
  if k == 0:
    return {}
  verify = plan.verify_untrusted
  ys, checks, labels = {}, {}, {}
  for c in model.groups[k - 1]:
    sp = plan.sites[c.site]
    p = params_k["convs"][c.name]
    if sp.mode == "trusted":
      y = ops.conv(priv_in["x"][c.site], p["kernel"], c.strides, c.padding)
    elif sp.mode == "dense":
      y = yr[c.name]
    else:
      y_r = yr[c.name].astype(p["kernel"].dtype)  # a bfloat16 residual back up
      if verify:
        checks[c.name] = _check_received(model, c, yr[c.name], priv_in, p, key)
        labels[c.name] = f"conv {c.name!r} (site {c.site!r})"
        if train:
          y_r = _tap_received(model, plan, c, y_r, yr[c.name], priv_in, p, key)
      if plan.protects_gradients and train:  # only a backward pass releases dY
        y_r = grad_lib.protect_output(
            y_r, priv_in["r"][c.site], p["kernel"],
            gradient_key(key, model.conv_index(c.name)), gradient_release(model, plan, c))
      y_l = (ops.lowrank_conv(priv_in["p"][c.site], priv_in["u"][c.site], p["kernel"], c)
             if yl is None else yl[c.name])
      y = ops.combine(y_l, y_r, None)
    ys[c.name] = ops.combine(None, y, p.get("bias"))
  if checks:
    integrity.enforce(checks, stage=k, direction="forward", labels=labels)
  return ys


def _check_received(model: StagedModel, c, y_received, priv_in: dict, p: dict, key: jax.Array):
  """Freivalds check of the accelerator's ``Y_R`` against the ``R`` this side released."""
  sg = jax.lax.stop_gradient
  return integrity.check_conv(sg(y_received), sg(priv_in["r"][c.site]), sg(p["kernel"]), c,
                              integrity_key(key, model.conv_index(c.name), "forward"))


def _tap_received(model: StagedModel, plan: Plan, c, y_r, y_received, priv_in: dict,
                  p: dict, key: jax.Array):
  """``Y_R`` with the backward check of its residual gradient attached."""
  r_sent = priv_in["r"][c.site]
  return integrity.tap_output(
      y_r, priv_in["probe"][c.site], p["kernel"],
      integrity_key(key, plan.sites[c.site].index, "backward"),
      integrity.OutputTap(spec=c, input_hw=tuple(r_sent.shape[1:3]),
                          result_dtype=jnp.dtype(y_received.dtype).name))


def apply_module(model: StagedModel, k: int, params_k: dict, stats_k: dict, ys: dict,
                 priv_in: dict, batch: Mapping[str, jax.Array], train: bool):
  """Step "apply" of stage ``k``: the stage module (normalisation, ReLU, pooling, shortcuts).

  Returns:
    ``(xs, carry, new_stats)``: the activations of the sites stage ``k``
    produces (the logits in the last stage), the shortcut carry and the
    updated batch statistics.
  """
  carry = dict(priv_in["carry"])
  if k == 0:
    model.check_input(batch["image"])
    carry = {"image": jnp.asarray(batch["image"], precision.float_dtype())}
  variables = {"params": params_k["stage"]}
  if stats_k:
    variables["batch_stats"] = stats_k
  stage = model.stages[k]
  if train and stats_k:
    (xs, carry), mutated = stage.apply(variables, ys, carry, True, mutable=["batch_stats"])
    return xs, carry, mutated["batch_stats"]
  xs, carry = stage.apply(variables, ys, carry, train)
  return xs, carry, stats_k


def release(plan: Plan, k: int, xs: Mapping[str, jax.Array], key: jax.Array,
            train: bool) -> tuple[dict, dict]:
  """Step "release" of stage ``k``: decompose each split site and release its residual.

  DESIGN section 3, step 1 and section 7: ``R`` (clipped and noised in DP
  mode) goes out; ``P`` and ``U`` (and ``R`` itself where gradient protection
  or the integrity checks need it) stay in the returned private state.
  """
  cfg, verify = plan.decomposition, plan.verify_untrusted
  rs, priv_out = {}, empty_private()
  for site, x in xs.items():
    sp = plan.sites[site]
    if sp.mode == "dense":
      rs[site] = x
    elif sp.mode == "trusted":
      priv_out["x"][site] = x
    else:
      d = dec.decompose(x, site_key(key, sp.index), sp.r_max, tau=cfg.tau,
                        num_iters=cfg.num_iters, scope=sp.mode, min_rank=cfg.min_rank)
      rs[site] = release_residual(plan, d.residual, key, sp.index)
      if (plan.protects_gradients and train) or verify:  # else a 2nd output: a copy of R
        priv_out["r"][site] = rs[site]
      if verify and train:
        rs[site], priv_out["probe"][site] = integrity.watch_residual(
            rs[site], integrity_key(key, sp.index, "backward"),
            integrity.ResidualCheck(site=site, stage=k, readers=sp.consumers))
      priv_out["p"][site] = d.p
      priv_out["u"][site] = d.u
  return rs, priv_out


def untrusted_group(model: StagedModel, plan: Plan, k: int, conv_params: Tree,
                    rs: Mapping[str, jax.Array],
                    residual_dtype: Any = None) -> dict[str, jax.Array]:
  """The accelerator's convolutions of group ``k``: ``Y_R = conv(R, W)`` (step 2)."""
  out = {}
  for c in model.groups[k]:
    if plan.sites[c.site].mode == "trusted":
      continue
    r = rs[c.site]
    if residual_dtype is not None:
      r = r.astype(residual_dtype)
    out[c.name] = ops.untrusted_conv(r, conv_params[c.name]["kernel"], c)
  return out


def run_untrusted(model: StagedModel, plan: Plan, params: Tree, stats: Tree,
                  hook: TrustedHook, residual_dtype: Any = None,
                  group: Callable[..., dict] | None = None, boundary: bool = False):
  """The untrusted program of one step: public weights in, loss out.

  ``group`` replaces :func:`untrusted_group` (same signature), e.g. to model a
  different accelerator arithmetic.  ``boundary`` hands the hook
  :func:`boundary_params` (the overlap layout of the process backends)
  instead of :func:`stage_params`.

  Returns:
    ``(loss, (new_stats, metrics))`` from the last trusted stage.
  """
  yr: dict = {}
  new_stats = {}
  loss = metrics = None
  for k in range(model.num_stages):
    pk = boundary_params(model, plan, params, k) if boundary else stage_params(model, params, k)
    rs, loss, metrics, st = hook(k, yr, pk, stage_stats(stats, k))
    new_stats[str(k)] = st
    if k < model.num_stages - 1:
      yr = (group or untrusted_group)(model, plan, k, params["convs"], rs, residual_dtype)
  return loss, ({"stages": new_stats}, metrics)


class InlineHook:
  """Trusted stages traced into the same program; private state in Python attributes.

  Used by the ``dense`` and ``inline`` backends (simulation: one process).
  """

  def __init__(self, model: StagedModel, plan: Plan, batch: Mapping[str, jax.Array],
               key: jax.Array, train: bool):
    self.model, self.plan, self.batch, self.key, self.train = model, plan, batch, key, train
    self.priv = empty_private()

  def __call__(self, k, yr, params_k, stats_k):
    (rs, self.priv, loss), (st, metrics) = trusted_stage(
        self.model, self.plan, k, params_k, stats_k, yr, self.priv, self.batch,
        self.key, self.train)
    return rs, loss, metrics, st


def inline_loss(model: StagedModel, plan: Plan, params: Tree, stats: Tree,
                batch: Mapping[str, jax.Array], key: jax.Array, step, train: bool,
                residual_dtype: Any = None):
  """Loss of the whole split network in one traced program (``dense``/``inline``)."""
  hook = InlineHook(model, plan, batch, step_key(key, step), train)
  return run_untrusted(model, plan, params, stats, hook, residual_dtype)


def batch_struct(model: StagedModel, batch_size: int) -> dict:
  """Shapes of a batch dict (``image``, ``label``, ``mask``) for ``model``."""
  dtype = precision.float_dtype()
  return {"image": jax.ShapeDtypeStruct((batch_size, *model.input_shape), dtype),
          "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
          "mask": jax.ShapeDtypeStruct((batch_size,), dtype)}


def stage_signatures(model: StagedModel, plan: Plan, batch_size: int, train: bool,
                     residual_dtype: Any = None, boundary: bool = False
                     ) -> list[dict[str, Any]]:
  """Abstract inputs and outputs of every trusted stage (no FLOPs).

  Returns:
    One dict per stage with the shapes of ``yr``, ``params``, ``stats`` (inputs
    from the untrusted side) and ``rs``, ``loss``, ``metrics``, ``new_stats``
    (outputs to it): what a process boundary must expect on each call.
    ``params`` has the :func:`boundary_params` layout when ``boundary``.
  """
  key = jax.random.key(0)
  variables = jax.eval_shape(model.init, key)
  params, stats = variables["params"], variables["batch_stats"]
  batch = batch_struct(model, batch_size)
  priv: Any = empty_private()
  yr: Any = {}
  sigs = []
  for k in range(model.num_stages):
    pk, sk = stage_params(model, params, k), stage_stats(stats, k)

    def f(pk, sk, yr, priv, batch, key, k=k):
      return trusted_stage(model, plan, k, pk, sk, yr, priv, batch, key, train)
    (rs, priv, loss), (new_stats, metrics) = jax.eval_shape(f, pk, sk, yr, priv, batch, key)
    if boundary:
      pk = boundary_params(model, plan, params, k)
    sigs.append({"yr": yr, "params": pk, "stats": sk, "rs": rs, "loss": loss,
                 "metrics": metrics, "new_stats": new_stats})
    if k < model.num_stages - 1:
      yr = jax.eval_shape(
          lambda cp, rs, k=k: untrusted_group(model, plan, k, cp, rs, residual_dtype),
          params["convs"], rs)
  return sigs

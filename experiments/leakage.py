r"""Mutual information between MNIST-5k digits and everything the untrusted side sees.

Usage:

  python -m experiments.leakage [--workdir=runs/leakage] \
      [--configs=dense,asymml_r1,asymml_r2,asymml_r4,asymml_dp_eps8] \
      [--num_samples=N] [--dim=D] [--k=K] [--pca_solver=randomized|exact] \
      [--max_features=F] [--sketch_dim=S] [--pretrain_steps=P] [--dp_steps=T] \
      [--width=W] [--seed=K] [--chunk=C]

For every configuration and every tensor class that crosses the trust
boundary in a training step (DESIGN section 2; :mod:`asymml_jax.evaluation.
step_view` extracts them from the program the backends run, so they are
exactly what crosses), the KSG estimate of ``I(image; tensor)`` over ``N``
training digits (rows = data points, one per image):

* ``activation``: the released activation residual at every split site of
  VGG11 (``s1`` .. ``s7``; the grayscale input ``s0`` never leaves under
  AsymML, its first conv runs fully trusted); for ``dense`` (the GPU-only
  baseline) the full activation at the same site, the reference point;
* ``output_gradient``: the output-gradient residual ``dY_R`` the accelerator
  receives for each split conv (``conv<k>`` reads ``s<k>``), per example (one
  example's backward, the label used by the trusted loss); for ``dense`` the
  full ``dY``;
* ``weight_gradient``: the gradient the untrusted optimizer holds for every
  parameter (the declared ``trusted_weight_gradient`` aggregate plus the
  accelerator's ``corr(R, dY_R)``), per conv (kernel and bias) and ``all``
  (every parameter, norms and head included), for a batch of one: the worst
  case of the aggregate.  AsymML does not hide it: without noise it *is* the
  dense gradient (the split network computes the dense function exactly), and
  in DP mode the enclave's share is not noised (not covered by epsilon).

Configurations (as in ``experiments/attack_inversion.py``, same public weights:
init plus ``--pretrain_steps`` dense Adam steps, same seed derivation):
``dense``; ``asymml_r<k>``: exactly ``k`` principal channels per sample, no
clipping or noise (sites with ``k >= min(C, HW)`` run fully trusted: nothing
crosses there, reported as ``exposed: false``, MI 0); ``asymml_dp_eps<e>``: the
release of ``experiments/configs/mnist_dp.py`` (rank 1/16 with tau 0.1,
per-sample subspaces, clip 0.01, grad_clip 1e-5) with ``sigma`` calibrated as
training calibrates it to ``(e, 1e-5)`` over ``--dp_steps`` steps.  Every
plan divides the loss by the expected batch size 64 (as DP training does), so
an example's ``dY`` is what it contributes to a 64-example step.

Estimator (:mod:`asymml_jax.evaluation.leakage`): both sides are standardised
and projected onto their top ``--dim`` principal components
(:func:`leakage.pca_project`; the images once, each tensor once), then
:func:`leakage.ksg_mutual_information` with ``--k`` neighbours: exactly
:func:`leakage.mutual_information` (a test checks the two agree).  Tensors
with more than ``--max_features`` features per example (the weight gradients
of the wider convs, and all of them together) are first reduced by a fixed
random sketch (a balanced CountSketch, :class:`Sketches`) to
``--sketch_dim``, the same sketch for every configuration.  Every step (the
sketch, the PCA) is a function of the exposed tensor, so by data processing
the true MI of what is estimated lower-bounds the MI of the full tensor; and
KSG itself *underestimates* strongly dependent pairs, more so as the
dimension grows (the ``estimator_check`` rows of the JSON show its bias on
Gaussians with known MI at the same ``dim``, ``k`` and ``N``).  The numbers
are lower-bound proxies: compare them across configurations at equal
``dim``, ``k`` and ``N``, not as absolute leakage.  Two references bracket
them: the *shuffled-pairs control* (the same estimate with the tensor's rows
permuted, so that the pairs are independent) shows the estimator's zero, and
for noised releases the analytic Gaussian-channel bound
(:func:`leakage.gaussian_channel_bound`, an *upper* bound on the full
tensor's MI) per release and for the ``L`` releases of one step.

Outputs: ``WORKDIR/leakage.json`` (per configuration, class and site:
``mi_nats``, ``mi_shuffled_nats``, ``fraction_of_dense``, ``features``,
``sketched``, and for noised releases ``bound_nats`` / ``bound_step_nats``),
rewritten after every configuration; ``WORKDIR/leakage.png`` (one heatmap
per class: configurations by site, MI in nats and percent of dense).

Defaults (1,500 training digits, dim 4, k 3, randomized PCA, tensors wider
than 8,192 features sketched to 2,048, 100 dense pre-training steps, seed 0):
225 s wall and 305 s CPU on this 2-core machine at load average 2 (626 s wall,
378 s CPU when shared with other jobs at load average 5-8; the results were
identical); ``docs/results/leakage.{json,png}``.  Measured there (nats; in
brackets: percent of dense at the same site):

  activation        s1    s2    s3    s4    s5    s6    s7
  dense           2.66  3.50  3.47  3.08  2.43  2.17  2.07
  asymml_r1       1.97  3.19  3.42  3.02  2.41  2.17  2.06   (74-100%)
  asymml_r2       1.69  2.13  2.66  2.69  2.22  2.14  1.90   (61-99%)
  asymml_r4       1.20  2.38  2.80  2.73  2.32   TEE   TEE   (45-95%)
  asymml_dp_eps8  0.00  0.00  0.00  0.00  0.03   TEE   TEE   (0-1%)

  output gradient conv1 conv2 conv3 conv4 conv5 conv6 conv7
  dense           0.19  0.28  0.31  0.37  0.41  0.41  0.48
  asymml_r1..r4   0.17-0.43                                 (85-100%)
  asymml_dp_eps8  0.00  0.02  0.02  0.00  0.01   TEE   TEE   (0-8%)

  weight gradient (batch of one): dense 0.19-0.47 per conv, 0.39 all
  parameters; asymml_r1..r4 identical (100%); asymml_dp_eps8 0.86-1.82,
  1.82 all (370-555%).

Shuffled-pairs control: at most 0.030 nats.  DP bound (sigma 1.695): 0.174
nats per release, 1.74 for the 10 releases of a step.  Without noise the
residuals keep most of what the dense activations reveal; with the noise of
epsilon 8 the residual releases are at the estimator's zero (below 10% of
dense), but the weight-gradient aggregate of a batch of one is not protected.
In DP mode it even measured higher than dense, and the noise plays no part in
that: with the clipping alone (sigma 0) it measured the same (1.60 vs 1.59
nats on 500 digits).  Clipping the residuals to 0.01 removes them from the
forward pass, so the dense-pretrained weights misclassify (mean cross-entropy
3.3 against 0.21 dense), and the per-example gradients, about 30 times larger,
vary more with the image; their enclave share is never noised.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
import zlib
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from asymml_jax import data as data_lib
from asymml_jax import plan as plan_lib
from asymml_jax import train as train_lib
from asymml_jax.evaluation import inversion
from asymml_jax.evaluation import leakage as leakage_lib
from asymml_jax.evaluation import step_view
from asymml_jax.models import get_model
from experiments.attack_configs import DEFAULT_CONFIGS, DP_CONFIG_MODULE, parse_configs
from experiments.attack_configs import DP as _DP
from experiments.attack_configs import RANK as _RANK

GOAL_FRACTION = 0.1  # goal: AsymML with DP at epsilon 8 below 10% of the dense MI
CLASSES: tuple[str, ...] = ("activation", "output_gradient", "weight_gradient")
ALL_PARAMS = "all"

_WORKDIR = flags.DEFINE_string("workdir", "runs/leakage", "Output folder.")
_CONFIGS = flags.DEFINE_string(
    "configs", DEFAULT_CONFIGS,
    "Comma-separated configurations: dense, asymml_r<k>, asymml_dp_eps<e>.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1500,
                                    "Training digits (data points) the MI is estimated over.")
_DIM = flags.DEFINE_integer("dim", 4, "PCA components per side.")
_K = flags.DEFINE_integer("k", 3, "KSG neighbours.")
_SOLVER = flags.DEFINE_enum("pca_solver", "randomized", list(leakage_lib.PCA_SOLVERS),
                            "PCA solver (randomized: fixed-seed randomized SVD).")
_MAX_FEATURES = flags.DEFINE_integer(
    "max_features", 8192, "Tensors with more features per example are sketched.")
_SKETCH_DIM = flags.DEFINE_integer("sketch_dim", 2048,
                                   "Width of the random sketch of wide tensors.")
_PRETRAIN = flags.DEFINE_integer("pretrain_steps", 100,
                                 "Dense Adam steps on the training split before measuring "
                                 "(0: weights at initialisation).")
_DP_STEPS = flags.DEFINE_integer("dp_steps", 210,
                                 "Training steps the DP noise is calibrated for.")
_WIDTH = flags.DEFINE_float("width", 0.25, "VGG11 channel multiplier.")
_SEED = flags.DEFINE_integer("seed", 0, "The one seed (weights, samples, noise, sketches).")
_CHUNK = flags.DEFINE_integer("chunk", 50, "Examples per vmapped batch-of-one chunk.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeakageSettings:
  """Everything the configurations share (validated).

  Attributes:
    num_samples: training digits the MI is estimated over (``> k``).
    dim: PCA components per side.
    k: KSG neighbours.
    pca_solver: ``exact`` or ``randomized`` (:data:`leakage.PCA_SOLVERS`).
    max_features: tensors with more features per example are sketched.
    sketch_dim: width of the random sketch (``>= dim``).
    pretrain_steps: dense Adam steps before measuring (``0``: init weights).
    dp_steps: steps the DP noise is calibrated for.
    width: VGG11 channel multiplier, in ``(0, 4]``.
    seed: the one seed, ``>= 0``.
    chunk: examples per jitted batch-of-one chunk.
    step_batch_size: expected examples per training step (the loss
      denominator of every plan; DP's expected Poisson batch size).
  """

  num_samples: int = 1500
  dim: int = 4
  k: int = 3
  pca_solver: str = "randomized"
  max_features: int = 8192
  sketch_dim: int = 2048
  pretrain_steps: int = 100
  dp_steps: int = 210
  width: float = 0.25
  seed: int = 0
  chunk: int = 50
  step_batch_size: int = 64

  def __post_init__(self):
    for name in ("num_samples", "dim", "k", "max_features", "sketch_dim", "dp_steps",
                 "chunk", "step_batch_size"):
      v = getattr(self, name)
      if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    for name in ("pretrain_steps", "seed"):
      v = getattr(self, name)
      if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if self.num_samples <= self.k + 1:
      raise ValueError(f"num_samples ({self.num_samples}) must exceed k + 1 = {self.k + 1}")
    if self.sketch_dim < self.dim:
      raise ValueError(f"sketch_dim ({self.sketch_dim}) must be >= dim ({self.dim})")
    if self.pca_solver not in leakage_lib.PCA_SOLVERS:
      raise ValueError(f"pca_solver must be one of {leakage_lib.PCA_SOLVERS}, got "
                       f"{self.pca_solver!r}")
    if not (isinstance(self.width, (int, float)) and 0 < self.width <= 4):
      raise ValueError(f"width must be in (0, 4], got {self.width}")


def dp_train_config(epsilon: float, settings: LeakageSettings) -> train_lib.TrainConfig:
  """``experiments/configs/mnist_dp.py`` at ``epsilon`` and the experiment's width."""
  config = importlib.import_module(DP_CONFIG_MODULE).get_config()
  config.width = float(settings.width)
  config.backend = "inline"
  config.batch_size = settings.step_batch_size
  config.privacy.enabled = True
  config.privacy.noise_multiplier = 0.0
  config.privacy.target_epsilon = float(epsilon)
  return train_lib.TrainConfig.from_config(config)


def make_configuration(name: str, model, settings: LeakageSettings,
                       num_train: int) -> tuple[plan_lib.Plan, dict[str, Any]]:
  """The batch-of-one training plan of a configuration and its descriptive fields.

  Plans come from :func:`inversion.exposure_plan` (dense, or per-sample splits
  wherever a split is possible), with ``expected_batch_size`` set to
  ``settings.step_batch_size``.
  """
  fields: dict[str, Any] = {"rank": None, "epsilon": None, "noise_multiplier": 0.0,
                            "clip": None, "grad_clip": None}
  if name == "dense":
    exposure = inversion.Exposure.dense(name)
  elif _RANK.match(name):
    r = int(_RANK.match(name).group(1))
    exposure = inversion.Exposure.fixed_rank(r, name)
    fields["rank"] = r
  elif _DP.match(name):
    cfg = dp_train_config(float(_DP.match(name).group(1)), settings)
    exposure, dp = inversion.calibrated_dp_exposure(cfg, model, num_train, settings.dp_steps,
                                                    name=name)
    pc = dp.privacy
    fields.update(rank_rule=dataclasses.asdict(cfg.decomposition),
                  epsilon=dp.epsilon(settings.dp_steps), delta=pc.delta,
                  noise_multiplier=pc.noise_multiplier, clip=pc.clip, grad_clip=pc.grad_clip,
                  dp_steps=settings.dp_steps, sampling_rate=dp.sampling_rate,
                  releases_per_step=dp.releases_per_step)
  else:
    raise ValueError(f"unknown configuration {name!r}")
  plan = dataclasses.replace(inversion.exposure_plan(model, exposure, 1),
                             expected_batch_size=float(settings.step_batch_size))
  fields["kind"] = exposure.kind
  fields["modes"] = {s: p.mode for s, p in plan.sites.items()}
  fields["r_max"] = {s: p.r_max for s, p in plan.sites.items() if p.split}
  if plan.privacy.enabled:
    fields["releases_per_step"] = plan.releases_per_step(train=True)
  return plan, fields


# ----------------------------------------------------------------------------
# Collecting the per-example tensors.
# ----------------------------------------------------------------------------


def table_sites(model, plans: Sequence[plan_lib.Plan]) -> dict[str, list[str]]:
  """The sites of the table, per class.

  ``activation``: the sites split under at least one AsymML plan (every
  non-input site if only ``dense`` runs); ``output_gradient``: the convs
  reading them; ``weight_gradient``: every conv, and ``all``.
  """
  split = [s for s in model.site_order
           if any(p.sites[s].split for p in plans)]
  if not split:
    split = [s for s in model.site_order if s != model.site_order[0]]
  convs = [c.name for c in model.convs.values() if c.site in split]
  return {"activation": split, "output_gradient": convs,
          "weight_gradient": list(model.convs) + [ALL_PARAMS]}


class Sketches:
  """Fixed random sketches of wide tensors, one per ``(class, site)``, shared by all configurations.

  A tensor with ``d > max_features`` features per example is reduced to
  ``sketch_dim`` features by a balanced CountSketch (Charikar, Chen and
  Farach-Colton 2002; the sparse embedding of Clarkson and Woodruff 2013):
  features are randomly permuted and signed (``+-1``), zero-padded to a
  multiple of ``sketch_dim`` and summed in consecutive blocks, so every output
  is a signed sum of ``ceil(d / sketch_dim)`` random input features.  A linear
  map with one non-zero per input feature: cheap enough to run inside the
  jitted per-example step (the full per-example weight gradients never reach
  the host), and a function of the exposed tensor, so by data processing it
  can only lower the mutual information.  Tables come from
  ``numpy.random.default_rng([seed, crc32(class/site)])``.
  """

  def __init__(self, *, seed: int, max_features: int, sketch_dim: int):
    self.seed, self.max_features, self.sketch_dim = seed, max_features, sketch_dim
    self._tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def needed(self, features: int) -> bool:
    return features > self.max_features

  def tables(self, widths: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{entry: (permutation, signs)}`` for every entry wider than ``max_features``."""
    out = {}
    for entry, d in widths.items():
      if not self.needed(d):
        continue
      key = f"{entry}/{d}"
      if key not in self._tables:
        g = np.random.default_rng([self.seed, zlib.crc32(entry.encode())])
        self._tables[key] = (g.permutation(d).astype(np.int32),
                             g.choice(np.array([-1.0, 1.0], np.float32), size=d))
      out[entry] = self._tables[key]
    return out

  def apply(self, rows: jax.Array, table: tuple[jax.Array, jax.Array]) -> jax.Array:
    """``rows (m, d)`` -> ``(m, sketch_dim)`` (jittable)."""
    perm, signs = table
    m, d = rows.shape
    block = -(-d // self.sketch_dim)
    x = rows[:, perm] * signs
    x = jnp.pad(x, ((0, 0), (0, block * self.sketch_dim - d)))
    return x.reshape(m, self.sketch_dim, block).sum(axis=-1)


def entry_rows(view: dict, sites: dict[str, list[str]]) -> dict[str, jax.Array]:
  """A chunk's view -> ``{"class/site": (m, features)}`` for the exposed entries (jittable).

  ``weight_gradient/<conv>`` concatenates that conv's kernel and bias;
  ``weight_gradient/all`` every parameter (norms and head included).
  """
  out: dict[str, jax.Array] = {}
  flat2 = lambda a: a.reshape(a.shape[0], -1)
  acts = view.get(step_view.ACTIVATION, {})
  for s in sites["activation"]:
    if s in acts:
      out[f"activation/{s}"] = flat2(acts[s])
  grads = {**view.get(step_view.OUTPUT_GRADIENT, {}),
           **view.get(step_view.OUTPUT_GRADIENT_RESIDUAL, {})}
  for c in sites["output_gradient"]:
    if c in grads:
      out[f"output_gradient/{c}"] = flat2(grads[c])
  leaves = {p: flat2(a) for p, a in sorted(view[step_view.WEIGHT_GRADIENT].items())}
  for c in sites["weight_gradient"]:
    parts = [a for p, a in leaves.items() if c == ALL_PARAMS or p.startswith(f"convs/{c}/")]
    out[f"weight_gradient/{c}"] = jnp.concatenate(parts, axis=1)
  return out


def collect(model, plan, params, stats, images: np.ndarray, labels: np.ndarray,
            ids: np.ndarray, key: jax.Array, sites: dict[str, list[str]], sketches: Sketches,
            chunk: int, log: Callable[[str], None] | None = None,
            name: str = "") -> tuple[dict[tuple[str, str], np.ndarray], dict[tuple[str, str], int]]:
  """Per-example views of ``images``, reduced to ``{(class, site): (n, features)}``.

  Example ``ids[i]`` runs as a batch of one with the key ``fold_in(key, ids[i])``
  (:func:`step_view.per_example_view_fn`), in jitted chunks of ``chunk`` (the
  last one padded with copies of its first example, dropped); entries wider
  than ``sketches.max_features`` are sketched inside the same program.

  Returns:
    ``(features, widths)``: the (possibly sketched) float32 rows per entry and
    the unsketched number of features of each entry.
  """
  view_fn = step_view.per_example_view_fn(model, plan)

  def rows_fn(params, stats, x, y, keys):
    return entry_rows(view_fn(params, stats, x, y, keys), sites)

  shapes = jax.eval_shape(rows_fn, params, stats,
                          jax.ShapeDtypeStruct((chunk, *images.shape[1:]), jnp.float32),
                          jax.ShapeDtypeStruct((chunk,), jnp.int32),
                          jax.ShapeDtypeStruct((chunk,), jax.random.key(0).dtype))
  widths = {e: int(a.shape[1]) for e, a in shapes.items()}
  tables = jax.tree_util.tree_map(jnp.asarray, sketches.tables(widths))

  @jax.jit
  def reduced(params, stats, x, y, keys, tables):
    rows = rows_fn(params, stats, x, y, keys)
    return {e: (sketches.apply(a, tables[e]) if e in tables else a) for e, a in rows.items()}

  n = len(images)
  parts: dict[str, list[np.ndarray]] = {e: [] for e in widths}
  t0 = time.perf_counter()
  all_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(ids, jnp.uint32))
  for start in range(0, n, chunk):
    stop = min(n, start + chunk)
    idx = np.arange(start, stop)
    if stop - start < chunk:
      idx = np.concatenate([idx, np.full(chunk - (stop - start), start)])
    out = reduced(params, stats, jnp.asarray(images[idx]), jnp.asarray(labels[idx], jnp.int32),
                  all_keys[idx], tables)
    for e, a in out.items():
      parts[e].append(np.asarray(a, np.float32)[:stop - start])
    if log is not None and start == 0:
      log(f"{name}: first chunk of {chunk} (with compilation) in "
          f"{time.perf_counter() - t0:.0f} s")
  split = lambda e: tuple(e.split("/", 1))
  return ({split(e): np.concatenate(p) for e, p in parts.items()},
          {split(e): d for e, d in widths.items()})


# ----------------------------------------------------------------------------
# Estimates.
# ----------------------------------------------------------------------------


def estimate(x_proj: np.ndarray, exposed: np.ndarray, settings: LeakageSettings,
             perm: np.ndarray) -> dict[str, Any]:
  """KSG estimate on PCA projections, and the shuffled-pairs control.

  ``x_proj`` is :func:`leakage.pca_project` of the images (computed once); the
  result equals ``leakage.mutual_information(images, exposed, dim, k,
  solver)`` (same projections, same default jitter seed), and
  ``mi_shuffled_nats`` is the same estimate with the exposed rows permuted by
  ``perm`` (independent pairs: the estimator's zero).
  """
  dim_y = min(settings.dim, *exposed.shape)
  y = leakage_lib.pca_project(exposed, dim_y, solver=settings.pca_solver)
  return {"mi_nats": leakage_lib.ksg_mutual_information(x_proj, y, k=settings.k),
          "mi_shuffled_nats": leakage_lib.ksg_mutual_information(x_proj, y[perm],
                                                                 k=settings.k),
          "dim_exposed": dim_y}


def release_bounds(cls: str, features: int, fields: dict[str, Any]) -> dict[str, Any]:
  """Gaussian-channel upper bounds of a noised release (``{}`` when not noised)."""
  sigma = fields.get("noise_multiplier") or 0.0
  if sigma <= 0 or cls == "weight_gradient":
    return {}
  clip = fields["clip"] if cls == "activation" else fields["grad_clip"]
  return {"bound_nats": leakage_lib.gaussian_channel_bound(
              clip=clip, noise_multiplier=sigma, dim=features),
          "bound_dimension_free_nats": leakage_lib.gaussian_channel_bound(
              clip=clip, noise_multiplier=sigma)}


def step_bound(model, plan, fields: dict[str, Any]) -> dict[str, Any]:
  """Bound on ``I(image; all L releases of one step)`` (chain rule, fresh noise each)."""
  sigma = fields.get("noise_multiplier") or 0.0
  if sigma <= 0:
    return {}
  total = 0.0
  for s, sp in plan.sites.items():
    if not sp.split:
      continue
    h, w, c = model.site_shapes[s]
    total += leakage_lib.gaussian_channel_bound(clip=fields["clip"], noise_multiplier=sigma,
                                                dim=h * w * c)
    for name in sp.consumers:
      conv = model.convs[name]
      ho, wo = conv.output_hw(h, w)
      total += leakage_lib.gaussian_channel_bound(
          clip=fields["grad_clip"], noise_multiplier=sigma, dim=ho * wo * conv.features)
  releases = plan.releases_per_step(train=True)
  return {"bound_step_nats": total, "releases_per_step": releases,
          "bound_step_dimension_free_nats": leakage_lib.gaussian_channel_bound(
              clip=fields["clip"], noise_multiplier=sigma, releases=releases)}


def add_fractions(table: dict[str, Any]) -> None:
  """``fraction_of_dense`` of every entry (``None`` without a positive dense estimate)."""
  dense = table["results"].get("dense")
  for row in table["results"].values():
    for cls, entries in row["classes"].items():
      for site, e in entries.items():
        ref = None if dense is None else dense["classes"].get(cls, {}).get(site)
        ok = ref is not None and ref.get("exposed") and ref["mi_nats"] > 0
        e["fraction_of_dense"] = e["mi_nats"] / ref["mi_nats"] if ok else None


def checks(table: dict[str, Any]) -> dict[str, Any]:
  """Issue 5's goal per DP configuration and class: every site below 10% of dense."""
  out = {}
  for name, row in table["results"].items():
    if not _DP.match(name):
      continue
    for cls, entries in row["classes"].items():
      fr = [e["fraction_of_dense"] for e in entries.values()]
      if fr and all(f is not None for f in fr):
        out[f"{name}_{cls}_mi_below_10pct_of_dense"] = max(fr) < GOAL_FRACTION
  return out


# ----------------------------------------------------------------------------
# Figure and table.
# ----------------------------------------------------------------------------


def plot_heatmaps(table: dict[str, Any], path: str) -> None:
  """One heatmap per class (stacked): configurations by site, MI in nats and % of dense."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  configs = [c for c in table["configs"] if c in table["results"]]
  sites = table["sites"]
  entries = [e for r in table["results"].values() for es in r["classes"].values()
             for e in es.values()]
  vmax = max([e["mi_nats"] for e in entries] + [1e-3])
  ctrl = max([e["mi_shuffled_nats"] for e in entries if e["exposed"]] + [0.0])
  n_cols = max(len(sites[c]) for c in CLASSES)
  fig, axes = plt.subplots(len(CLASSES), 1, squeeze=False,
                           figsize=(0.95 * n_cols + 3.2, (0.45 * len(configs) + 0.9) * 3 + 0.8))
  try:
    image = None
    for ax, cls in zip(axes[:, 0], CLASSES):
      cols = sites[cls]
      grid = np.full((len(configs), len(cols)), np.nan)
      for i, c in enumerate(configs):
        for j, s in enumerate(cols):
          e = table["results"][c]["classes"].get(cls, {}).get(s)
          if e is None:
            continue
          grid[i, j] = e["mi_nats"]
          frac = e.get("fraction_of_dense")
          text = f"{e['mi_nats']:.2f}" if e["exposed"] else "TEE"
          if e["exposed"] and frac is not None and c != "dense":
            text += f" ({100 * frac:.0f}%)"
          ax.text(j, i, text, ha="center", va="center", fontsize=7,
                  color="black" if e["mi_nats"] > 0.6 * vmax else "white")
      image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
      ax.set_xticks(range(len(cols)))
      ax.set_xticklabels(cols, fontsize=8)
      ax.set_yticks(range(len(configs)))
      ax.set_yticklabels(configs, fontsize=8)
      title = {"activation": "activation residual R (dense: full activation X) per site",
               "output_gradient": "output-gradient residual dY_R (dense: full dY) per conv",
               "weight_gradient": "weight gradient of a batch of one (the aggregate; "
                                  "conv k reads site s_k; all = every parameter)"}[cls]
      ax.set_title(title, fontsize=9)
    est = table["estimator"]
    lines = [f"I(image; what the untrusted side sees): KSG (k={est['k']}) on {est['dim']}-dim "
             f"PCA, n={est['n']} MNIST-5k digits (lower-bound proxy). Cell: nats (% of dense).",
             f"Shuffled-pairs control (the estimator's zero) <= {ctrl:.3f} nats."]
    for name, r in table["results"].items():
      if r.get("noise_multiplier"):
        lines.append(f"{name}: sigma {r['noise_multiplier']:.3f}; Gaussian-channel bound "
                     f"<= {1 / (2 * r['noise_multiplier'] ** 2):.3f} nats per release, "
                     f"{r['bound_step_nats']:.2f} for the {r['releases_per_step']} releases "
                     "of a step; weight gradient not covered")
    fig.suptitle("\n".join(lines), fontsize=8.5)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="nats", fraction=0.025, pad=0.01)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.path.basename(path)}")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
  finally:
    plt.close(fig)


def format_table(table: dict[str, Any]) -> str:
  """Configuration x class x site: MI, shuffled control, % of dense, bound."""
  head = (f"{'configuration':<16} {'class':<16} {'site':<6} {'MI nats':>8} {'shuffled':>9} "
          f"{'% dense':>8} {'bound':>8}")
  lines = [head, "-" * len(head)]
  for name in table["configs"]:
    row = table["results"].get(name)
    if row is None:
      continue
    for cls in CLASSES:
      for site, e in row["classes"].get(cls, {}).items():
        if not e["exposed"]:
          lines.append(f"{name:<16} {cls:<16} {site:<6} {'(runs in the TEE: nothing crosses)':>36}")
          continue
        frac = e.get("fraction_of_dense")
        bound = e.get("bound_nats")
        lines.append(f"{name:<16} {cls:<16} {site:<6} {e['mi_nats']:>8.3f} "
                     f"{e['mi_shuffled_nats']:>9.3f} "
                     f"{'-' if frac is None else f'{100 * frac:.1f}':>8} "
                     f"{'-' if bound is None else f'{bound:.3f}':>8}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------


def run_leakage(*, configs: Sequence[str], workdir: str, settings: LeakageSettings,
                log: Callable[[str], None] = print, model=None) -> dict[str, Any]:
  """Runs every configuration and writes the JSON table and the PNG heatmaps.

  Args:
    configs: configuration names (:func:`parse_configs`).
    workdir: output folder.
    settings: what every configuration shares.
    log: progress sink.
    model: the staged model (default: VGG11 at ``settings.width`` with
      GroupNorm, as the inversion attack; tests pass a smaller one); its input
      must be MNIST-5k's ``(32, 32, 1)``.

  Returns:
    The table written to ``WORKDIR/leakage.json``.
  """
  t0, cpu0 = time.perf_counter(), time.process_time()
  load0 = os.getloadavg()
  json_path = os.path.join(workdir, "leakage.json")
  png_path = os.path.join(workdir, "leakage.png")
  ds = data_lib.load_dataset("mnist5k")
  n_train = len(ds.train_images)
  if settings.num_samples > n_train:
    raise ValueError(f"num_samples must be <= {n_train} (training digits), got "
                     f"{settings.num_samples}")
  rng = np.random.default_rng([settings.seed, 7])
  ids = np.sort(rng.choice(n_train, size=settings.num_samples, replace=False))
  perm = np.random.default_rng([settings.seed, 8]).permutation(settings.num_samples)
  images = np.asarray(ds.train_images[ids], np.float32)
  labels = np.asarray(ds.train_labels[ids], np.int32)
  if model is None:
    model = get_model("vgg11", num_classes=ds.num_classes, input_shape=ds.image_shape,
                      width=settings.width, norm="group")
  root = jax.random.key(settings.seed)
  weight_key, view_key = jax.random.split(root)  # as experiments/attack_inversion.py
  variables = inversion.public_weights(
      model, weight_key, train_steps=settings.pretrain_steps, images=ds.train_images,
      labels=ds.train_labels, seed=settings.seed)
  params, stats = variables["params"], variables["batch_stats"]
  log(f"{settings.num_samples} training digits; {model.name} width {model.width} {model.norm} "
      "norm; "
      f"weights: init + {settings.pretrain_steps} dense steps "
      f"({time.perf_counter() - t0:.0f} s); load average {load0[0]:.2f}")

  made = [make_configuration(name, model, settings, n_train) for name in configs]
  sites = table_sites(model, [p for p, f in made if f["kind"] != "dense"])
  sketches = Sketches(seed=settings.seed, max_features=settings.max_features,
                      sketch_dim=settings.sketch_dim)
  dim_x = min(settings.dim, *images.reshape(len(images), -1).shape)
  x_proj = leakage_lib.pca_project(images, dim_x, solver=settings.pca_solver)
  sanity = leakage_lib.estimator_sanity_check(
      rng=np.random.default_rng([settings.seed, 9]), n=settings.num_samples,
      dims=(settings.dim,), rhos=(0.0, 0.5, 0.9, 0.99), k=settings.k)
  table: dict[str, Any] = {
      "dataset": "mnist5k", "model": model.name, "norm": model.norm, "width": model.width,
      "settings": dataclasses.asdict(settings), "configs": list(configs), "sites": sites,
      "samples": {"split": "train", "n": settings.num_samples,
                  "rows": "one per image (data points), a seeded random subset"},
      "estimator": {
          "name": "KSG 2004 estimator 1 on standardised PCA projections "
                  "(asymml_jax.evaluation.leakage)",
          "dim": settings.dim, "k": settings.k, "n": settings.num_samples,
          "pca_solver": settings.pca_solver,
          "sketch": f"tensors wider than {settings.max_features} features: balanced "
                    f"CountSketch (random permutation and signs, block sums) to "
                    f"{settings.sketch_dim} features, fixed per class and site, shared by "
                    "every configuration",
          "reading": "lower-bound proxies of I(image; tensor): compare at equal dim, k, n; "
                     "KSG underestimates strongly dependent pairs, more so at higher dim "
                     "(see estimator_check); mi_shuffled_nats is the estimator's zero; "
                     "bound_nats is the analytic Gaussian-channel upper bound of a noised "
                     "release"},
      "estimator_check": sanity,
      "notes": [
          "dense also releases the raw image at s0 and dY at conv0; AsymML never does "
          "(grayscale input: conv0 runs fully in the TEE); not tabulated",
          "weight_gradient is the gradient of a batch of one (the worst case of the "
          "aggregate the untrusted optimizer holds); AsymML does not hide it: without "
          "noise it equals the dense gradient, with DP the enclave's share is not noised "
          "(ledger: trusted_weight_gradient, not covered by epsilon)",
          "output_gradient: dY_R (AsymML, decomposed per example over output channels) "
          "or the full dY (dense), per example, loss divided by the expected batch size"],
      "results": {}}

  def save():
    add_fractions(table)
    table["checks"] = checks(table)
    table["wall_seconds"] = time.perf_counter() - t0
    table["cpu_seconds"] = time.process_time() - cpu0
    table["load_average"] = {"start": list(load0), "end": list(os.getloadavg())}
    train_lib.write_json_atomic(json_path, table)

  for i, (name, (plan, fields)) in enumerate(zip(configs, made)):
    tc = time.perf_counter()
    feats, widths = collect(model, plan, params, stats, images, labels, ids,
                            jax.random.fold_in(view_key, i), sites, sketches,
                            settings.chunk, log=log, name=name)
    tv = time.perf_counter() - tc
    log(f"{name}: {len(feats)} exposed tensors of {settings.num_samples} examples in "
        f"{tv:.0f} s; estimating")
    classes: dict[str, dict[str, Any]] = {c: {} for c in CLASSES}
    for cls in CLASSES:
      for site in sites[cls]:
        if (cls, site) not in feats:
          classes[cls][site] = {"exposed": False, "mi_nats": 0.0, "mi_shuffled_nats": 0.0,
                                "note": "runs fully in the TEE: nothing crosses"}
          continue
        d = widths[(cls, site)]
        e = {"exposed": True, "features": d, "sketched": sketches.needed(d),
             **estimate(x_proj, feats[(cls, site)], settings, perm),
             **release_bounds(cls, d, fields)}
        if cls == "weight_gradient" and fields.get("noise_multiplier"):
          e["bound_nats"] = None
          e["note"] = "not covered by the DP mechanism: the enclave's share is not noised"
        classes[cls][site] = e
    del feats
    table["results"][name] = {**fields, **step_bound(model, plan, fields), "classes": classes,
                              "seconds": time.perf_counter() - tc}
    save()
    summary = ", ".join(
        f"{cls} max {max(e['mi_nats'] for e in classes[cls].values()):.2f}"
        for cls in CLASSES if classes[cls])
    log(f"{name}: {summary} nats ({time.perf_counter() - tc:.0f} s)")
  plot_heatmaps(table, png_path)
  save()
  log(format_table(table))
  log(f"checks: {table['checks']}")
  log(f"table: {json_path}\nfigure: {png_path}\ntotal: {table['wall_seconds']:.0f} s "
      f"wall, {table['cpu_seconds']:.0f} s CPU (load average {load0[0]:.2f} at start, "
      f"{os.getloadavg()[0]:.2f} at end)")
  return table


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    configs = parse_configs(_CONFIGS.value)
    settings = LeakageSettings(
        num_samples=_NUM_SAMPLES.value, dim=_DIM.value, k=_K.value,
        pca_solver=_SOLVER.value, max_features=_MAX_FEATURES.value,
        sketch_dim=_SKETCH_DIM.value, pretrain_steps=_PRETRAIN.value,
        dp_steps=_DP_STEPS.value, width=_WIDTH.value, seed=_SEED.value, chunk=_CHUNK.value)
    run_leakage(configs=configs, workdir=_WORKDIR.value, settings=settings,
                log=lambda line: print(line, flush=True))
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)

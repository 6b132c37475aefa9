"""Per-layer split planner and MAC/byte cost model (DESIGN section 5, "Planner").

For every decomposition *site* (an activation read by one or more
convolutions) the planner counts, for one forward pass over a batch:

* ``trusted``: the whole convolution in the enclave (``k^2 C Cout HW_out``
  MACs per sample and per conv), nothing crosses;
* ``per_sample``: subspace iteration and projections
  (``(2 n_iter + 4) HW C r`` per sample), the per-sample kernel fold
  (``k^2 C r Cout``) and the low-rank convolution (``HW_out k^2 r Cout``) in the
  enclave; the dense convolution on the accelerator; ``R`` out and ``Y_R`` back;
* ``per_batch``: as ``per_sample`` but one ``U`` and one fold per batch.

It picks the cheapest mode (trusted MACs) the privacy configuration allows; a
site with ``r_max >= min(C, HW)`` runs fully trusted.  The same counts feed the
benchmarks' "trusted MAC ratio" (dense MACs over trusted MACs).

A training step adds the backward pass (:func:`site_train_costs`): a fully
trusted conv's backward costs twice its forward (input and weight
gradients); a split site's trusted share twice its low-rank convs and folds,
once its projections (``U`` is a constant for autodiff) and, under gradient
protection, the decomposition of every consumer's output gradient and the
TEE's gradient shares (:func:`asymml_jax.roofline.gradient_protection_macs`).
The formulas live in :mod:`asymml_jax.roofline`, which models every trusted
stage with them.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from asymml_jax import roofline
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.models.base import StagedModel
from asymml_jax.privacy.config import PrivacyConfig

MODES: tuple[str, ...] = ("dense", "trusted", "per_sample", "per_batch")
SPLIT_MODES: tuple[str, ...] = ("per_sample", "per_batch")
BYTES_PER_ELEMENT = roofline.BYTES_PER_ELEMENT


@dataclasses.dataclass(frozen=True)
class SitePlan:
  """The decision for one site, with its costs for one forward pass of a batch.

  ``*_train`` fields count one training step (forward and backward);
  ``protection_macs`` is what gradient protection adds to
  ``trusted_macs_train`` (counted only when the plan protects gradients).
  """

  site: str
  index: int
  mode: str
  r_max: int
  height: int
  width: int
  channels: int
  consumers: tuple[str, ...]
  dense_macs: int
  trusted_macs: int
  untrusted_macs: int
  bytes_across: int
  dense_macs_train: int
  trusted_macs_train: int
  protection_macs: int

  @property
  def split(self) -> bool:
    return self.mode in SPLIT_MODES

  @property
  def scope(self) -> str:
    return self.mode if self.split else "none"


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """Per-site modes and costs for a model, batch size and decomposition config.

  Attributes:
    model: model name.
    batch_size: rows of a (padded) batch: the static shape every stage sees.
    decomposition: the rank rule.
    sites: per-site decisions.
    privacy: what the trusted stages do to every release (clipping, noise,
      gradient protection; DESIGN sections 3 and 7), with ``noise_multiplier``
      already fixed (calibrated) when DP is on.
    expected_batch_size: with Poisson sampling, the expected number of real
      examples per batch; the loss divides by it instead of the realised
      count, so one example's gradient never depends on which others were
      drawn (the per-example sensitivity DP needs).  ``None``: the count.
  """

  model: str
  batch_size: int
  decomposition: DecompositionConfig
  sites: Mapping[str, SitePlan]
  privacy: PrivacyConfig = PrivacyConfig()
  expected_batch_size: float | None = None

  @property
  def verify_untrusted(self) -> bool:
    """Whether the trusted stages check the accelerator's results (:mod:`asymml_jax.integrity`)."""
    return self.decomposition.verify_untrusted

  @property
  def protects_gradients(self) -> bool:
    """Whether output gradients of split convolutions are decomposed before leaving."""
    return self.privacy.gradient_protection == "decompose"

  def releases_per_step(self, train: bool = True) -> int:
    """``L``: tensors released per example and step (DESIGN section 7, accounting).

    One residual per split site in the forward pass and, in training with
    gradient protection, one output-gradient residual per convolution reading
    a split site.
    """
    split = [s for s in self.sites.values() if s.split]
    n = len(split)
    if train and self.protects_gradients:
      n += sum(len(s.consumers) for s in split)
    return n

  @property
  def dense_macs(self) -> int:
    return sum(s.dense_macs for s in self.sites.values())

  @property
  def trusted_macs(self) -> int:
    return sum(s.trusted_macs for s in self.sites.values())

  @property
  def untrusted_macs(self) -> int:
    return sum(s.untrusted_macs for s in self.sites.values())

  @property
  def bytes_across(self) -> int:
    return sum(s.bytes_across for s in self.sites.values())

  @property
  def trusted_mac_ratio(self) -> float:
    """Fully-trusted MACs over this plan's trusted MACs (higher is better)."""
    return self.dense_macs / max(1, self.trusted_macs)

  @property
  def dense_macs_train(self) -> int:
    """MACs of a fully trusted training step (forward and backward)."""
    return sum(s.dense_macs_train for s in self.sites.values())

  @property
  def trusted_macs_train(self) -> int:
    """Trusted MACs of a training step, gradient protection included when on."""
    total = sum(s.trusted_macs_train for s in self.sites.values())
    if self.protects_gradients:
      total += sum(s.protection_macs for s in self.sites.values())
    return total

  @property
  def trusted_mac_ratio_train(self) -> float:
    """:attr:`trusted_mac_ratio` of a training step (forward and backward)."""
    return self.dense_macs_train / max(1, self.trusted_macs_train)

  def mode(self, site: str) -> str:
    return self.sites[site].mode

  def table(self) -> str:
    """The plan as a fixed-width text table with a totals line."""
    head = (f"{'site':<10} {'C':>5} {'HxW':>9} {'r_max':>5} {'mode':<10} "
            f"{'trusted MACs':>14} {'untrusted MACs':>15} {'bytes across':>13}")
    lines = [f"plan for {self.model}, batch {self.batch_size} (forward pass)", head,
             "-" * len(head)]
    for s in self.sites.values():
      lines.append(
          f"{s.site:<10} {s.channels:>5} {f'{s.height}x{s.width}':>9} {s.r_max:>5} "
          f"{s.mode:<10} {s.trusted_macs:>14,} {s.untrusted_macs:>15,} {s.bytes_across:>13,}")
    lines.append("-" * len(head))
    lines.append(
        f"{'total':<10} {'':>5} {'':>9} {'':>5} {'':<10} {self.trusted_macs:>14,} "
        f"{self.untrusted_macs:>15,} {self.bytes_across:>13,}")
    lines.append(f"fully trusted MACs: {self.dense_macs:,}; trusted-MAC ratio "
                 f"(fully trusted / this plan): {self.trusted_mac_ratio:.2f}x")
    lines.append(f"training step (forward + backward): trusted MACs "
                 f"{self.trusted_macs_train:,} of {self.dense_macs_train:,}; trusted-MAC "
                 f"ratio {self.trusted_mac_ratio_train:.2f}x "
                 f"(forward {self.trusted_mac_ratio:.2f}x)")
    return "\n".join(lines)

  def to_dict(self) -> dict:
    return {
        "model": self.model,
        "batch_size": self.batch_size,
        "sites": [dataclasses.asdict(s) for s in self.sites.values()],
        "dense_macs": self.dense_macs,
        "trusted_macs": self.trusted_macs,
        "untrusted_macs": self.untrusted_macs,
        "bytes_across": self.bytes_across,
        "trusted_mac_ratio": self.trusted_mac_ratio,
        "dense_macs_train": self.dense_macs_train,
        "trusted_macs_train": self.trusted_macs_train,
        "trusted_mac_ratio_train": self.trusted_mac_ratio_train,
        "privacy": dataclasses.asdict(self.privacy),
        "expected_batch_size": self.expected_batch_size,
        "releases_per_step": self.releases_per_step(),
    }


def site_costs(model: StagedModel, site: str, mode: str, r: int, batch_size: int,
               num_iters: int) -> tuple[int, int, int, int]:
  """``(dense, trusted, untrusted, bytes)`` for one site in one mode (see module doc)."""
  h, w, c = model.site_shapes[site]
  hw = h * w
  convs = model.consumers(site)
  dense = batch_size * sum(cv.macs(h, w) for cv in convs)
  if mode == "trusted":
    return dense, dense, 0, 0
  out_elems = sum(cv.output_hw(h, w)[0] * cv.output_hw(h, w)[1] * cv.features
                  for cv in convs)
  bytes_across = BYTES_PER_ELEMENT * batch_size * (hw * c + out_elems)
  if mode == "dense":
    return dense, 0, dense, bytes_across
  decomp = (roofline.decomposition_macs(h, w, c, r, num_iters, batch_size, mode)
            + roofline.projection_macs(h, w, c, r, batch_size))
  return dense, decomp + _lowrank_and_folds(model, site, mode, r, batch_size), dense, bytes_across


def _lowrank_and_folds(model: StagedModel, site: str, mode: str, r: int,
                       batch_size: int) -> int:
  """MACs of a split site's low-rank convs ``conv(P, W')`` and kernel folds."""
  h, w, _ = model.site_shapes[site]
  return sum(batch_size * cv.macs(h, w, in_channels=r)
             + roofline.fold_macs(cv, r, batch_size, mode) for cv in model.consumers(site))


def site_train_costs(model: StagedModel, site: str, mode: str, r: int, batch_size: int,
                     decomposition: DecompositionConfig) -> tuple[int, int, int]:
  """``(dense, trusted, protection)`` MACs of one site in one training step.

  Backward: twice the forward for a conv (input and weight gradients), once
  for the projections; ``protection`` is the extra trusted work of gradient
  protection (see the module docstring), zero unless split.
  """
  dense, trusted, _, _ = site_costs(model, site, mode, r, batch_size, decomposition.num_iters)
  bwd = roofline.BACKWARD_FACTOR
  if mode not in SPLIT_MODES:
    return (1 + bwd) * dense, (1 + bwd) * trusted, 0
  h, w, c = model.site_shapes[site]
  backward = (bwd * _lowrank_and_folds(model, site, mode, r, batch_size)
              + roofline.projection_macs(h, w, c, r, batch_size))
  protection = sum(
      roofline.gradient_protection_macs(cv, h, w, decomposition.r_max(cv.features),
                                        decomposition.num_iters, batch_size)
      for cv in model.consumers(site))
  return (1 + bwd) * dense, trusted + backward, protection


def make_plan(model: StagedModel, batch_size: int,
              decomposition: DecompositionConfig = DecompositionConfig(), *,
              allow_per_batch: bool | None = None, force: str | None = None,
              privacy: PrivacyConfig = PrivacyConfig(),
              expected_batch_size: float | None = None) -> Plan:
  """Chooses a mode for every site of ``model``.

  Args:
    model: the staged model.
    batch_size: samples per batch (per-batch folds amortise over it).
    decomposition: rank rule; ``scope='per_batch'`` allows per-batch subspaces.
    allow_per_batch: overrides what ``decomposition.scope`` allows.
    force: ``dense`` (everything untrusted: the GPU-only baseline),
      ``trusted`` (TEE-only), or a split mode applied wherever a split is
      possible (sites with ``r_max >= min(C, HW)`` stay trusted).
    privacy: release settings (see :class:`Plan`); DP mode never plans
      ``per_batch`` (it mixes samples).
    expected_batch_size: see :class:`Plan`.

  Returns:
    The :class:`Plan`.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if force is not None and force not in MODES:
    raise ValueError(f"force must be one of {MODES}, got {force!r}")
  if allow_per_batch is None:
    allow_per_batch = decomposition.scope == "per_batch"
  if privacy.enabled:
    if decomposition.rank_plan == "calibrate":
      raise ValueError("privacy is enabled: rank_plan='calibrate' picks ranks from private "
                       "data, visible outside the enclave (its timing, the plan it reports) "
                       "and covered by no epsilon; use rank_plan='fraction'")
    if allow_per_batch or force == "per_batch":
      raise ValueError("privacy is enabled: per_batch subspaces mix samples (one sample's "
                       "residual would depend on the others); use scope='per_sample'")
  sites = {}
  for index, site in enumerate(model.site_order):
    h, w, c = model.site_shapes[site]
    r = decomposition.r_max(c)
    can_split = r < min(c, h * w)
    if force in ("dense", "trusted"):
      mode = force
    elif force in SPLIT_MODES:
      mode = force if can_split else "trusted"
    else:
      candidates = ["trusted"]
      if can_split:
        candidates += ["per_sample"] + (["per_batch"] if allow_per_batch else [])
      mode = min(candidates, key=lambda m: site_costs(
          model, site, m, r, batch_size, decomposition.num_iters)[1])
    sites[site] = _site_plan(model, site, index, mode, r, batch_size, decomposition)
  return Plan(model=model.name, batch_size=batch_size, decomposition=decomposition,
              sites=sites, privacy=privacy, expected_batch_size=expected_batch_size)


def _site_plan(model: StagedModel, site: str, index: int, mode: str, r: int, batch_size: int,
               decomposition: DecompositionConfig) -> SitePlan:
  h, w, c = model.site_shapes[site]
  dense, trusted, untrusted, nbytes = site_costs(
      model, site, mode, r, batch_size, decomposition.num_iters)
  dense_t, trusted_t, protection = site_train_costs(model, site, mode, r, batch_size,
                                                    decomposition)
  return SitePlan(
      site=site, index=index, mode=mode, r_max=r, height=h, width=w, channels=c,
      consumers=tuple(cv.name for cv in model.consumers(site)), dense_macs=dense,
      trusted_macs=trusted, untrusted_macs=untrusted, bytes_across=nbytes,
      dense_macs_train=dense_t, trusted_macs_train=trusted_t, protection_macs=protection)


def with_ranks(model: StagedModel, plan: Plan, ranks: Mapping[str, int]) -> Plan:
  """``plan`` with the static rank of some split sites replaced (modes unchanged).

  Used with calibrated ranks (:mod:`asymml_jax.calibration`): each site keeps
  the mode the untrusted side planned, and its costs are recounted at the
  new ``r``.
  """
  sites = dict(plan.sites)
  for site, r in ranks.items():
    sp = sites[site]
    if not sp.split:
      raise ValueError(f"site {site!r} runs {sp.mode}: only split sites have a rank")
    if not 1 <= r < min(sp.channels, sp.height * sp.width):
      raise ValueError(f"site {site!r}: rank {r} must be in [1, min(C, HW))")
    sites[site] = _site_plan(model, site, sp.index, sp.mode, int(r), plan.batch_size,
                             plan.decomposition)
  return dataclasses.replace(plan, sites=sites)

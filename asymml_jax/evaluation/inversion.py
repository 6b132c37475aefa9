"""Model-inversion attack on what the untrusted side sees (DESIGN section 7, issue 5).

DESIGN section 7 ("Empirical leakage") asks for "a model-inversion attack (a
decoder trained on attacker-held data disjoint from the victim's, reported as
SSIM/PSNR on victim data) ... reported against the dense (GPU-only)
exposure".  This module is that attack, as a library:

1. **Split** (:func:`attack_split`, :func:`check_disjoint`): the attacker
   holds a subset of the *training* images; the victim's images are the
   *held-out* split.  The two are disjoint by source row (for MNIST-5k, the
   rows of the csv, :func:`asymml_jax.data.mnist5k_split_indices`) and by
   content (an attacker image identical to any victim image is dropped).
2. **Exposure** (:class:`Exposure`, :func:`exposure_plan`,
   :func:`stage_release`, :func:`extract_exposures`): the tensor the
   accelerator receives for the site read by conv group ``stage`` (default 1:
   the output of trusted stage 1, i.e. conv1 -> norm -> ReLU -> pool in the
   paper's 1-based numbering, ``s1`` of VGG11).  Under a dense plan (the
   GPU-only baseline) that is the full activation ``X``; under an AsymML plan
   it is the residual ``R = X - U U^T X`` (DESIGN section 1), and in DP mode
   ``clip_c(R) + N(0, (sigma c)^2 I)`` (DESIGN section 7).  The exposure is
   computed by the very functions the backends run
   (:func:`asymml_jax.stages.trusted_stage`,
   :func:`asymml_jax.stages.untrusted_group`), so it is exactly what crosses.
   The input site ``s0`` of a grayscale model is never exposed under AsymML
   (``r >= C``: the first conv runs fully trusted, DESIGN section 2), which is
   why the first *split* site is the reference point; the dense exposure at
   the same site is the baseline.
3. **Decoder** (:class:`Decoder`, :func:`train_decoder`): a small
   convolutional decoder (3x3 convs, 2x nearest-neighbour upsamplings to the
   image size) trained with Adam on the attacker's (exposure, image) pairs to
   minimise the pixel MSE, its inputs standardised per channel with the
   attacker's statistics (:class:`Standardiser`).  The attacker knows the
   mechanism, the weights and the privacy settings (all public, DESIGN
   section 2) and simulates the release on its own images with its own
   randomness (a key stream independent of the victim's).
4. **Metrics** (:func:`image_metrics`): mean SSIM and PSNR over the victim
   images (scikit-image), reconstructions clipped to the pixel range, which
   the attacker knows.  ``data_range`` is the range of the (normalised) image
   values.  The headline SSIM is that of Wang et al. 2004 (Gaussian window,
   ``sigma = 1.5``, population covariances: scikit-image's
   ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``); the
   scikit-image default (uniform 7x7 window) is reported alongside as
   ``ssim_uniform7``.  Both count windows of matching constant background as
   similar, so an attacker who learnt *nothing* still scores above zero:
   :func:`prior_baselines` measures that floor (the attacker's mean image, a
   blank image) and every report should show it.  A decoder fed pure noise
   can score *below* that floor (it fits the noise of its training set); an
   attacker could then do better by ignoring the release, so compare a
   protected exposure against ``max(decoder, prior_mean)``.

Weights.  The weights are public (DESIGN section 2); the attack uses one
fixed set for every configuration, so that the configurations differ only in
what is exposed.  :func:`public_weights` returns the model at initialisation,
optionally after ``train_steps`` dense (non-DP) Adam steps on the training
split (never on the victim's held-out images).  A trained checkpoint is not
required: the first stage of a network is close to invertible either way
(16 random or trained 3x3 filters of a 32x32 grayscale image), and the dense
exposure at the same weights is the reference the AsymML exposures are
compared against.

Randomness (DESIGN section 11): every function that draws takes a JAX key or
a numpy ``Generator``; there is no default key.  :func:`run_inversion` derives
the attacker's release key, the victim's release key and the decoder's key
from its key with ``fold_in`` and fixed stream ids.

References:
  Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli, "Image quality
  assessment: from error visibility to structural similarity", IEEE TIP 13(4),
  2004 (SSIM, eq. 13; Gaussian window with sigma 1.5).
  Z. He, T. Zhang, R. B. Lee, "Model inversion attacks against collaborative
  inference", ACSAC 2019 (the black-box inverse-network attack used here).
  Niu, Ali, Avestimehr, "3LegRace: Privacy-preserving DNN training over TEEs
  and GPUs", PETS 2022 (the exposure: residual ``R = X - U U^T X``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from skimage import metrics as skmetrics

from asymml_jax import data as data_lib
from asymml_jax import plan as plan_lib
from asymml_jax import stages
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.models.base import StagedModel
from asymml_jax.privacy.config import PrivacyConfig

Tree = Any

# Key streams of :func:`run_inversion` (fold_in ids; distinct by construction).
ATTACKER_STREAM = 1
VICTIM_STREAM = 2
DECODER_STREAM = 3

# SSIM as in Wang et al. 2004 (scikit-image's documented way to match it).
WANG_SSIM = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
EXPOSURE_KINDS: tuple[str, ...] = ("dense", "asymml")


# ----------------------------------------------------------------------------
# The attacker / victim split.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttackSplit:
  """Which images the attacker holds and which are the victim's.

  Attributes:
    attacker: positions in ``dataset.train_images`` (the attacker's data).
    victim: positions in ``dataset.test_images`` (the victim's held-out data).
    attacker_rows: source-row ids of the attacker images (for MNIST-5k, rows
      of the csv), or ``None`` when the data set has no source ids.
    victim_rows: source-row ids of the victim images, or ``None``.
  """

  attacker: np.ndarray
  victim: np.ndarray
  attacker_rows: np.ndarray | None = None
  victim_rows: np.ndarray | None = None


def _source_rows(dataset: data_lib.Dataset):
  """``(train_rows, test_rows)`` source ids of a data set, if it has them."""
  if dataset.name == "mnist5k":
    train_rows, test_rows = data_lib.mnist5k_split_indices()
    if (len(train_rows) == len(dataset.train_images)
        and len(test_rows) == len(dataset.test_images)):
      return np.asarray(train_rows), np.asarray(test_rows)
  return None, None


def attack_split(dataset: data_lib.Dataset, *, num_attacker: int | None,
                 num_victim: int | None, rng: np.random.Generator) -> AttackSplit:
  """Draws the attacker's images from the train split, the victim's from the test split.

  The attacker's images are a uniformly random subset (``rng``) of the
  training images whose content differs from every victim image (duplicates
  are removed before drawing); the victim's are the first ``num_victim``
  held-out images (all of them by default).  See :func:`check_disjoint`.

  Args:
    dataset: a :class:`asymml_jax.data.Dataset` (e.g. ``load_dataset("mnist5k")``).
    num_attacker: attacker images (``None``: every eligible training image).
    num_victim: victim images (``None``: every held-out image).
    rng: numpy ``Generator`` drawing the attacker subset (required).

  Returns:
    The :class:`AttackSplit`.

  Raises:
    ValueError: sizes out of range, or ``rng`` not a Generator.
  """
  if not isinstance(rng, np.random.Generator):
    raise ValueError(f"rng must be a numpy Generator, got {type(rng).__name__}")
  n_test = len(dataset.test_images)
  num_victim = n_test if num_victim is None else num_victim
  if not (isinstance(num_victim, int) and 1 <= num_victim <= n_test):
    raise ValueError(f"num_victim must be an int in [1, {n_test}], got {num_victim!r}")
  victim = np.arange(num_victim)
  victim_bytes = {np.ascontiguousarray(dataset.test_images[i]).tobytes() for i in victim}
  eligible = np.array([i for i in range(len(dataset.train_images))
                       if np.ascontiguousarray(dataset.train_images[i]).tobytes()
                       not in victim_bytes], dtype=np.int64)
  num_attacker = len(eligible) if num_attacker is None else num_attacker
  if not (isinstance(num_attacker, int) and 1 <= num_attacker <= len(eligible)):
    raise ValueError(f"num_attacker must be an int in [1, {len(eligible)}] (training images "
                     f"not identical to a victim image), got {num_attacker!r}")
  attacker = np.sort(rng.choice(eligible, size=num_attacker, replace=False))
  train_rows, test_rows = _source_rows(dataset)
  return AttackSplit(
      attacker=attacker, victim=victim,
      attacker_rows=None if train_rows is None else train_rows[attacker],
      victim_rows=None if test_rows is None else test_rows[victim])


def check_disjoint(dataset: data_lib.Dataset, split: AttackSplit) -> None:
  """Raises ``ValueError`` unless attacker and victim data are disjoint.

  Checks, in order: the positions are valid and unique within their split;
  the source rows (when known) do not intersect; and no attacker image array
  is identical (byte for byte) to a victim image array.

  Raises:
    ValueError: naming the first overlap found.
  """
  for name, idx, n in (("attacker", split.attacker, len(dataset.train_images)),
                       ("victim", split.victim, len(dataset.test_images))):
    idx = np.asarray(idx)
    if idx.ndim != 1 or len(idx) == 0 or idx.min() < 0 or idx.max() >= n:
      raise ValueError(f"{name} positions must be a non-empty 1-D array in [0, {n})")
    if len(np.unique(idx)) != len(idx):
      raise ValueError(f"{name} positions repeat")
  if split.attacker_rows is not None and split.victim_rows is not None:
    common = np.intersect1d(split.attacker_rows, split.victim_rows)
    if len(common):
      raise ValueError(f"attacker and victim share source rows {common[:10].tolist()}")
  victim = {np.ascontiguousarray(dataset.test_images[i]).tobytes(): int(i)
            for i in split.victim}
  for i in split.attacker:
    j = victim.get(np.ascontiguousarray(dataset.train_images[i]).tobytes())
    if j is not None:
      raise ValueError(f"attacker image train[{int(i)}] is identical to victim image "
                       f"test[{j}]")


# ----------------------------------------------------------------------------
# Exposures: what the accelerator receives.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Exposure:
  """One configuration of what the untrusted side sees at the attacked site.

  Attributes:
    name: label in tables and plots.
    kind: ``dense`` (GPU-only baseline: the full activation leaves) or
      ``asymml`` (per-sample decomposition: the residual leaves).
    decomposition: the rank rule of ``asymml`` (ignored for ``dense``).
    privacy: the release settings of ``asymml``: disabled (plain residual) or
      enabled with a fixed, calibrated ``noise_multiplier`` (DESIGN section 7).
  """

  name: str
  kind: str
  decomposition: DecompositionConfig = DecompositionConfig()
  privacy: PrivacyConfig = PrivacyConfig()

  def __post_init__(self):
    if not (isinstance(self.name, str) and self.name):
      raise ValueError(f"exposure name must be a non-empty string, got {self.name!r}")
    if self.kind not in EXPOSURE_KINDS:
      raise ValueError(f"exposure kind must be one of {EXPOSURE_KINDS}, got {self.kind!r}")
    if self.kind == "dense" and self.privacy.enabled:
      raise ValueError("a dense exposure releases the full activation; privacy cannot be "
                       "enabled on it")
    if self.privacy.enabled:
      if self.privacy.target_epsilon is not None:
        raise ValueError("exposure privacy needs a fixed noise_multiplier (calibrate "
                         "target_epsilon first, e.g. with calibrated_dp_exposure)")
      if self.decomposition.scope != "per_sample":
        raise ValueError("DP exposures need scope='per_sample' (DESIGN section 7)")

  @classmethod
  def dense(cls, name: str = "dense") -> "Exposure":
    """The GPU-only baseline: the full activation leaves."""
    return cls(name=name, kind="dense")

  @classmethod
  def fixed_rank(cls, rank: int, name: str | None = None) -> "Exposure":
    """AsymML with exactly ``rank`` principal channels kept, no clipping or noise."""
    if not (isinstance(rank, int) and rank >= 1):
      raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    return cls(name=name or f"asymml_r{rank}", kind="asymml",
               decomposition=DecompositionConfig(rank_fraction=1.0, min_rank=rank,
                                                 max_rank=rank, tau=0.0,
                                                 scope="per_sample"))


def calibrated_dp_exposure(train_config, model: StagedModel, num_train: int,
                           total_steps: int, name: str = "asymml_dp") -> tuple[Exposure, Any]:
  """The DP exposure of a training configuration, ``sigma`` calibrated as training does.

  Uses :meth:`asymml_jax.train.DpRun.make` (same ``q``, steps and releases per
  step ``L`` as a real run), so the noise is exactly the one a run of
  ``total_steps`` steps at ``train_config.privacy.target_epsilon`` releases.

  Args:
    train_config: a :class:`asymml_jax.train.TrainConfig` with privacy enabled
      (e.g. from ``experiments/configs/mnist_dp.py``).
    model: the model it trains (same width and normalisation).
    num_train: training examples ``N``.
    total_steps: steps of the run.
    name: the exposure's label.

  Returns:
    ``(exposure, dp_run)``.
  """
  from asymml_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  if not train_config.privacy.enabled:
    raise ValueError("calibrated_dp_exposure needs a config with privacy.enabled")
  dp = train_lib.DpRun.make(train_config, model, num_train, total_steps)
  return Exposure(name=name, kind="asymml", decomposition=train_config.decomposition,
                  privacy=dp.privacy), dp


def attacked_site(model: StagedModel, stage: int = 1) -> str:
  """The site read by conv group ``stage`` (``s1`` of VGG11 for ``stage = 1``)."""
  if not 1 <= stage < model.num_stages - 1:
    raise ValueError(f"stage must be in [1, {model.num_stages - 2}], got {stage}")
  sites = {c.site for c in model.groups[stage]}
  if len(sites) != 1:
    raise ValueError(f"conv group {stage} reads several sites {sorted(sites)}")
  return sites.pop()


def exposure_plan(model: StagedModel, exposure: Exposure, batch_size: int,
                  stage: int = 1) -> plan_lib.Plan:
  """The plan under which the exposure is released (dense, or per-sample splits).

  Raises:
    ValueError: if the attacked site would run fully trusted (nothing exposed).
  """
  if exposure.kind == "dense":
    return plan_lib.make_plan(model, batch_size, force="dense")
  plan = plan_lib.make_plan(model, batch_size, exposure.decomposition, force="per_sample",
                            privacy=exposure.privacy)
  site = attacked_site(model, stage)
  if not plan.sites[site].split:
    raise ValueError(f"{exposure.name}: site {site} runs fully trusted under this "
                     f"decomposition (r_max {plan.sites[site].r_max} >= min(C, HW)): "
                     "nothing is exposed there")
  return plan


def stage_release(model: StagedModel, plan: plan_lib.Plan, params: Tree, stats: Tree,
                  images: jax.Array, key: jax.Array,
                  stage: int = 1) -> tuple[jax.Array, dict]:
  """What the accelerator receives for the site read by group ``stage``, one batch.

  Runs trusted stages ``0..stage`` and untrusted groups ``0..stage-1`` exactly
  as the backends do (DESIGN section 3, "Forward, one stage"), in inference
  mode.

  Args:
    model: the staged model.
    plan: from :func:`exposure_plan`.
    params: public weights ``{'convs', 'stages'}``.
    stats: batch statistics ``{'stages'}``.
    images: ``(B, H, W, C)`` with ``B == plan.batch_size``.
    key: the step's trusted key (sites derive theirs with ``fold_in``).
    stage: the attacked stage.

  Returns:
    ``(exposed, private)``: the released tensor ``(B, h, w, c)`` (the full
    activation under a dense plan, the possibly clipped and noised residual
    under a split plan) and the private state after stage ``stage``
    (``private['u'][site]`` holds ``U``).
  """
  site = attacked_site(model, stage)
  priv = stages.empty_private()
  yr: dict = {}
  batch = {"image": images}
  rs: dict = {}
  for k in range(stage + 1):
    (rs, priv, _), _ = stages.trusted_stage(
        model, plan, k, stages.stage_params(model, params, k), stages.stage_stats(stats, k),
        yr, priv, batch, key, False)
    if k < stage:
      yr = stages.untrusted_group(model, plan, k, params["convs"], rs)
  return rs[site], priv


def extract_exposures(model: StagedModel, plan: plan_lib.Plan, params: Tree, stats: Tree,
                      images: np.ndarray, key: jax.Array, stage: int = 1) -> np.ndarray:
  """:func:`stage_release` over many images, in batches of ``plan.batch_size``.

  Batch ``i`` uses the trusted key ``step_key(key, i)`` (DESIGN section 11); the
  last batch is padded with zero images whose outputs are dropped.

  Returns:
    ``(N, h, w, c)`` float32 numpy array.
  """
  if key is None:
    raise ValueError("a key is required (release noise and subspace starts)")
  images = np.asarray(images, np.float32)
  n, b = len(images), plan.batch_size
  fn = jax.jit(lambda p, s, x, k: stage_release(model, plan, p, s, x, k, stage)[0])
  out = []
  for i, start in enumerate(range(0, n, b)):
    chunk = images[start:start + b]
    real = len(chunk)
    if real < b:
      chunk = np.concatenate([chunk, np.zeros((b - real,) + chunk.shape[1:], np.float32)])
    out.append(np.asarray(fn(params, stats, chunk, stages.step_key(key, i)))[:real])
  return np.concatenate(out).astype(np.float32)


def public_weights(model: StagedModel, key: jax.Array, *, train_steps: int = 0,
                   images: np.ndarray | None = None, labels: np.ndarray | None = None,
                   batch_size: int = 64, learning_rate: float = 2e-3,
                   seed: int = 0) -> dict:
  """The (public) weights the attack runs against.

  The model at initialisation (``model.init`` with the first half of
  ``split(key)``), then optionally
  ``train_steps`` dense (non-DP) Adam steps on ``images``/``labels`` (shuffled
  batches of :func:`asymml_jax.data.train_batches` with ``seed``).  Pass the
  training split only, never the victim's held-out images.

  Returns:
    ``{'params', 'batch_stats'}``.
  """
  if key is None:
    raise ValueError("a key is required (initialisation)")
  init_key, trusted_key = jax.random.split(key)
  variables = model.init(init_key)
  if train_steps <= 0:
    return variables
  if images is None or labels is None:
    raise ValueError("train_steps > 0 needs training images and labels")
  plan = plan_lib.make_plan(model, batch_size, force="dense")
  tx = optax.adam(learning_rate)
  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state, batch, i):
    def loss_fn(p):
      loss, (new_stats, _) = stages.inline_loss(model, plan, p, stats, batch, trusted_key, i,
                                                  True)
      return loss, new_stats
    (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state

  for i, batch in data_lib.train_batches(images, labels, batch_size, seed=seed):
    if i >= train_steps:
      break
    params, stats, opt_state = step(params, stats, opt_state, batch, i)
  return {"params": params, "batch_stats": stats}


# ----------------------------------------------------------------------------
# The decoder.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
  """Decoder architecture and training settings (validated).

  Attributes:
    features: channels of the decoder's convolutions.
    epochs: passes over the attacker's data.
    batch_size: examples per Adam step (capped at the data size).
    learning_rate: Adam's step size.
  """

  features: int = 64
  epochs: int = 10
  batch_size: int = 64
  learning_rate: float = 2e-3

  def __post_init__(self):
    for name in ("features", "epochs", "batch_size"):
      v = getattr(self, name)
      if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"decoder {name} must be an int >= 1, got {v!r}")
    if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate <= 1):
      raise ValueError(f"decoder learning_rate must be in (0, 1], got {self.learning_rate!r}")


class Decoder(nn.Module):
  """Inverse network: exposure ``(h, w, c)`` -> image ``out_shape`` (He et al. 2019).

  A 3x3 conv, then 2x nearest-neighbour upsamplings each followed by a 3x3
  conv (resize-convolution: no checkerboard artefacts, and on XLA:CPU about 3x
  faster to train than stride-2 transposed convs) until the spatial size
  reaches the image's, a bilinear resize if it overshoots or is not a
  power-of-two multiple, a 3x3 conv, and a final 3x3 conv to the image
  channels.  ReLU between layers, linear output.
  """

  out_shape: tuple[int, int, int]
  features: int = 64

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, w, c = self.out_shape
    x = nn.relu(nn.Conv(self.features, (3, 3))(x))
    while x.shape[1] < h or x.shape[2] < w:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = nn.relu(nn.Conv(self.features, (3, 3))(x))
    if x.shape[1:3] != (h, w):
      x = jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), "bilinear")
    x = nn.relu(nn.Conv(self.features, (3, 3))(x))
    return nn.Conv(c, (3, 3))(x)


@dataclasses.dataclass(frozen=True)
class Standardiser:
  """Per-channel standardisation of exposures, fitted on the attacker's data."""

  mean: np.ndarray
  std: np.ndarray

  @classmethod
  def fit(cls, exposed: np.ndarray) -> "Standardiser":
    x = np.asarray(exposed, np.float64)
    axes = tuple(range(x.ndim - 1))
    std = x.std(axis=axes)
    return cls(mean=x.mean(axis=axes).astype(np.float32),
               std=np.where(std > 1e-12, std, 1.0).astype(np.float32))

  def __call__(self, exposed: np.ndarray) -> np.ndarray:
    return ((np.asarray(exposed, np.float32) - self.mean) / self.std).astype(np.float32)


def train_decoder(exposed: np.ndarray, images: np.ndarray, *, config: DecoderConfig,
                  key: jax.Array) -> tuple[Decoder, Tree, list[float]]:
  """Fits a :class:`Decoder` from (standardised) exposures to images by pixel MSE.

  Adam (optax) over ``config.epochs`` passes, one jitted step per batch; each
  epoch visits a fresh permutation (``fold_in(order_key, epoch)``) in full batches (the remainder
  of a permutation is skipped, a different one every epoch).

  Args:
    exposed: ``(N, h, w, c)`` decoder inputs (already standardised).
    images: ``(N, H, W, C)`` targets.
    config: the :class:`DecoderConfig`.
    key: JAX key: ``split`` into the init key and the order key (required).

  Returns:
    ``(decoder, params, losses)``; ``losses[e]`` is the mean training MSE of
    epoch ``e`` (measured during the epoch).
  """
  if key is None:
    raise ValueError("a key is required (decoder init and batch order)")
  exposed = jnp.asarray(exposed, jnp.float32)
  images = jnp.asarray(images, jnp.float32)
  n = exposed.shape[0]
  if images.shape[0] != n:
    raise ValueError(f"{n} exposures but {images.shape[0]} images")
  b = min(config.batch_size, n)
  steps = n // b
  decoder = Decoder(out_shape=tuple(int(v) for v in images.shape[1:]),
                    features=config.features)
  init_key, order_key = jax.random.split(key)
  params = decoder.init(init_key, exposed[:1])
  tx = optax.adam(config.learning_rate)
  opt_state = tx.init(params)

  def loss_fn(p, x, y):
    return jnp.mean((decoder.apply(p, x) - y) ** 2)

  # One jitted step per batch from a Python loop: on XLA:CPU, convolutions
  # inside a lax.scan body run an order of magnitude slower than at top level.
  @jax.jit
  def step(params, opt_state, xs, ys, idx):
    loss, g = jax.value_and_grad(loss_fn)(params, xs[idx], ys[idx])
    u, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state, loss

  history = []
  for e in range(config.epochs):
    perm = jax.random.permutation(jax.random.fold_in(order_key, e), n)
    batches = perm[:steps * b].reshape(steps, b)
    losses = []
    for i in range(steps):
      params, opt_state, loss = step(params, opt_state, exposed, images, batches[i])
      losses.append(loss)
    history.append(float(jnp.mean(jnp.stack(losses))))
  return decoder, params, history


def reconstruct(decoder: Decoder, params: Tree, exposed: np.ndarray,
                batch_size: int = 250) -> np.ndarray:
  """Decoder outputs for (standardised) exposures, in fixed-size padded batches."""
  exposed = np.asarray(exposed, np.float32)
  n = len(exposed)
  fn = jax.jit(decoder.apply)
  b = min(batch_size, n)
  out = []
  for start in range(0, n, b):
    chunk = exposed[start:start + b]
    real = len(chunk)
    if real < b:
      chunk = np.concatenate([chunk, np.zeros((b - real,) + chunk.shape[1:], np.float32)])
    out.append(np.asarray(fn(params, chunk))[:real])
  return np.concatenate(out)


# ----------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------


def image_metrics(originals: np.ndarray, recons: np.ndarray, *, low: float,
                  high: float) -> dict[str, float]:
  """Mean SSIM and PSNR of reconstructions against the originals (scikit-image).

  Reconstructions are clipped to ``[low, high]`` (the pixel range, known to
  the attacker) and ``data_range = high - low``.  ``ssim`` is Wang et al.
  2004 (:data:`WANG_SSIM`), ``ssim_uniform7`` scikit-image's default uniform
  7x7 window; ``psnr`` is ``10 log10(data_range^2 / MSE)`` per image, then
  averaged (an exact reconstruction, infinite PSNR, is capped at 100 dB).

  Args:
    originals: ``(N, H, W, C)``.
    recons: ``(N, H, W, C)``.
    low: smallest pixel value.
    high: largest pixel value (``> low``).

  Returns:
    ``{"ssim", "ssim_std", "ssim_uniform7", "psnr", "psnr_std", "mse", "n"}``.
  """
  originals = np.asarray(originals, np.float64)
  recons = np.clip(np.asarray(recons, np.float64), low, high)
  if originals.shape != recons.shape or originals.ndim != 4:
    raise ValueError(f"originals {originals.shape} and reconstructions {recons.shape} must "
                     "both be (N, H, W, C)")
  if not high > low:
    raise ValueError(f"need high > low, got [{low}, {high}]")
  dr = float(high - low)
  ssim, ssim7, psnr = [], [], []
  for x, y in zip(originals, recons):
    ssim.append(skmetrics.structural_similarity(x, y, data_range=dr, channel_axis=-1,
                                                **WANG_SSIM))
    ssim7.append(skmetrics.structural_similarity(x, y, data_range=dr, channel_axis=-1,
                                                 win_size=7))
    mse = float(np.mean((x - y) ** 2))
    psnr.append(100.0 if mse == 0 else
                float(skmetrics.peak_signal_noise_ratio(x, y, data_range=dr)))
  return {"ssim": float(np.mean(ssim)), "ssim_std": float(np.std(ssim)),
          "ssim_uniform7": float(np.mean(ssim7)), "psnr": float(np.mean(psnr)),
          "psnr_std": float(np.std(psnr)),
          "mse": float(np.mean((originals - recons) ** 2)), "n": int(len(originals))}


def prior_baselines(attacker_images: np.ndarray, victim_images: np.ndarray, *, low: float,
                    high: float) -> dict[str, dict[str, float]]:
  """Scores of attackers that ignore the exposure (the floor of the metrics).

  * ``prior_mean``: every reconstruction is the attacker's mean image (what an
    MSE decoder converges to when the input carries no information);
  * ``prior_blank``: every reconstruction is the background value ``low``.
  """
  mean = np.mean(np.asarray(attacker_images, np.float64), axis=0)
  victim = np.asarray(victim_images)
  return {
      "prior_mean": image_metrics(victim, np.broadcast_to(mean, victim.shape), low=low,
                                  high=high),
      "prior_blank": image_metrics(victim, np.full(victim.shape, low), low=low, high=high),
  }


# ----------------------------------------------------------------------------
# One attack, end to end.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class InversionResult:
  """One configuration's attack: metrics, a few reconstructions, the loss curve."""

  name: str
  metrics: dict[str, float]
  losses: list[float]
  examples: np.ndarray  # the first reconstructions (clipped), for the figure
  exposure_shape: tuple[int, ...]
  seconds: float

  def to_dict(self) -> dict[str, Any]:
    return {"name": self.name, **self.metrics, "decoder_losses": list(self.losses),
            "exposure_shape": list(self.exposure_shape), "seconds": self.seconds}


def run_inversion(model: StagedModel, variables: Mapping[str, Tree], exposure: Exposure,
                  attacker_images: np.ndarray, victim_images: np.ndarray, *,
                  decoder: DecoderConfig, key: jax.Array, batch_size: int = 250,
                  stage: int = 1, low: float, high: float, num_examples: int = 8,
                  log: Callable[[str], None] | None = None) -> InversionResult:
  """Trains the decoder on the attacker's exposures and scores it on the victim's.

  Keys: the attacker's releases use ``fold_in(key, ATTACKER_STREAM)``, the
  victim's ``fold_in(key, VICTIM_STREAM)`` (independent noise and subspace
  starts) and the decoder ``fold_in(key, DECODER_STREAM)``.

  Args:
    model: the staged model.
    variables: ``{'params', 'batch_stats'}`` (:func:`public_weights`).
    exposure: what is released.
    attacker_images: ``(Na, H, W, C)`` the attacker's images.
    victim_images: ``(Nv, H, W, C)`` the victim's images.
    decoder: decoder settings.
    key: JAX key (required).
    batch_size: rows per release batch.
    stage: the attacked stage (:func:`attacked_site`).
    low: smallest pixel value (reconstructions are clipped to ``[low, high]``).
    high: largest pixel value.
    num_examples: reconstructions kept for the figure (the first victims).
    log: optional progress sink.

  Returns:
    The :class:`InversionResult`.
  """
  if key is None:
    raise ValueError("a key is required")
  t0 = time.perf_counter()
  plan = exposure_plan(model, exposure, batch_size, stage)
  params, stats = variables["params"], variables["batch_stats"]
  exp_a = extract_exposures(model, plan, params, stats, attacker_images,
                            jax.random.fold_in(key, ATTACKER_STREAM), stage)
  exp_v = extract_exposures(model, plan, params, stats, victim_images,
                            jax.random.fold_in(key, VICTIM_STREAM), stage)
  standardise = Standardiser.fit(exp_a)
  dec, dparams, losses = train_decoder(standardise(exp_a), attacker_images, config=decoder,
                                       key=jax.random.fold_in(key, DECODER_STREAM))
  recon = np.clip(reconstruct(dec, dparams, standardise(exp_v)), low, high)
  m = image_metrics(victim_images, recon, low=low, high=high)
  seconds = time.perf_counter() - t0
  if log is not None:
    log(f"{exposure.name}: SSIM {m['ssim']:.3f} (uniform-7 {m['ssim_uniform7']:.3f}), "
        f"PSNR {m['psnr']:.2f} dB on {m['n']} victim images; decoder MSE "
        f"{losses[0]:.3f} -> {losses[-1]:.3f}; exposure {exp_v.shape[1:]}; {seconds:.0f} s")
  return InversionResult(name=exposure.name, metrics=m, losses=losses,
                         examples=recon[:num_examples], exposure_shape=tuple(exp_v.shape[1:]),
                         seconds=seconds)


__all__ = [
    "AttackSplit", "Decoder", "DecoderConfig", "Exposure", "InversionResult", "Standardiser",
    "WANG_SSIM", "attack_split", "attacked_site", "calibrated_dp_exposure", "check_disjoint",
    "exposure_plan", "extract_exposures", "image_metrics", "prior_baselines",
    "public_weights", "reconstruct", "run_inversion", "stage_release", "train_decoder",
]

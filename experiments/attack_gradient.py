r"""Gradient-inversion attack on MNIST-5k: dense vs AsymML vs AsymML with DP.

Usage:

  python -m experiments.attack_gradient [--workdir=runs/attack_gradient] \
      [--configs=dense,asymml_r1,asymml_r2,asymml_r4,asymml_dp_eps8] \
      [--channels=weight_gradient,residuals,both] [--batch_sizes=1] \
      [--num_victim=N] [--steps=S] [--learning_rate=LR] [--tv_weight=A] \
      [--restarts=R] [--labels=known|recovered] [--pretrain_steps=P] [--dp_steps=T] [--width=W] [--seed=K]

For every configuration, the untrusted side's view of one training step on a
victim batch is computed with :mod:`asymml_jax.evaluation.gradient_attack`
(the inline backend's program: exactly what crosses) and inverted by gradient
matching (Geiping et al. 2020: cosine distance, total variation, Adam on
signed gradients), once per observation channel:

* ``weight_gradient``: the batch's whole weight gradient, which the untrusted
  side holds under every configuration (under AsymML: its own
  ``corr(R, dY_R)`` plus the enclave's ``trusted_weight_gradient`` aggregate);
* ``residuals``: the released activation residuals and output-gradient
  residuals (under dense: every full activation, the raw image included, and
  every full output gradient);
* ``both``: the two distances summed.

Configurations (as ``experiments/attack_inversion.py``):

* ``dense``: the GPU-only baseline;
* ``asymml_r<k>``: exactly ``k`` principal channels per sample kept in the
  enclave, residuals released in the clear (no clipping, no noise);
* ``asymml_dp_eps<e>``: ``experiments/configs/mnist_dp.py``'s decomposition and
  release settings (clip 0.01, grad_clip 1e-5, per-sample subspaces) with
  ``sigma`` calibrated as training calibrates it
  (:meth:`asymml_jax.train.DpRun.make`) to ``(e, 1e-5)``-DP over
  ``--dp_steps`` steps; the loss is divided by the expected batch size (64)
  as in DP training.

The attacker knows the weights (one public set for all configurations:
:func:`inversion.public_weights`, init plus ``--pretrain_steps`` dense Adam
steps on the training split; the same weights as ``attack_inversion`` at the
same seed), the architecture and the privacy settings, and (by default) the
labels.  The victim images are the first ``--num_victim`` held-out digits, cut
into batches of each ``--batch_sizes`` entry; the attacker's data
(``--num_attacker`` training digits, checked disjoint from the victim's) only
serve the no-information floor ``prior_mean``.

Outputs: ``WORKDIR/attack_gradient.json`` (per configuration, channel and
batch size: SSIM (Wang et al. 2004), ``ssim_uniform7``, PSNR, the final and
at-the-truth matching distances, iDLG label-recovery accuracy; the floors
``prior_mean`` / ``prior_blank``; checks), rewritten after every
configuration, and ``WORKDIR/attack_gradient.png`` (originals, then one row
per configuration and channel).

Defaults (4 victim digits in batches of 1, 400 signed-Adam steps at 0.25,
TV 0.05, one start, labels known, VGG11 width 0.25 after 100 dense
pre-training steps) took 9.3 minutes on the shared 2-core CPU (load 1.8-3,
seed 0; ``docs/results/attack_gradient.{json,png}``).  Measured (Wang SSIM /
uniform-7 SSIM / PSNR dB; "dist" the final matching distance, "@truth" the
same objective at the victim's image):

  configuration   channel          SSIM   SSIM-u7  PSNR   dist  @truth
  dense           weight_gradient  0.173  0.155    14.3   0.079  0.017
  dense           residuals        0.800  0.820    27.2   0.039  0.017
  dense           both             0.810  0.817    26.1   0.072  0.017
  asymml_r1       weight_gradient  0.183  0.167    14.5   0.186  0.017
  asymml_r1       residuals        0.614  0.639    20.2   0.046  0.025
  asymml_r1       both             0.597  0.611    19.6   0.089  0.025
  asymml_r2       weight_gradient  0.128  0.117    13.7   0.088  0.017
  asymml_r2       residuals        0.370  0.391    16.5   0.141  0.044
  asymml_r2       both             0.410  0.433    17.3   0.181  0.044
  asymml_r4       weight_gradient  0.207  0.186    14.5   0.192  0.017
  asymml_r4       residuals        0.572  0.582    19.8   0.142  0.080
  asymml_r4       both             0.582  0.602    20.1   0.199  0.080
  asymml_dp_eps8  weight_gradient -0.040 -0.035     7.3   0.177  0.070
  asymml_dp_eps8  residuals       -0.196 -0.317    11.0   0.999  1.016
  asymml_dp_eps8  both            -0.020 -0.019     8.1   1.181  1.070
  prior_mean                       0.118  (mean image; PSNR 13.0)
  prior_blank                      0.252  (blank background; PSNR 11.0)

Without noise, the released residuals (and under dense the activations, the
raw image included) are inverted almost exactly; the weight gradient, which
the untrusted side holds under *every* configuration (identical to the dense
one when noise is off), gives recognisable digits on a noisy background
(low SSIM, visibly the right digit for most; see the PNG).  With the DP noise
of epsilon 8 this attack fails on every channel; for the residuals the noise
dominates (the truth matches no better than the attacker's result), but for
the weight gradient the truth matches far better (0.070) than what the
optimiser found (0.177): the aggregate, which epsilon does not cover, still
singles out the image, and the failure is the optimiser's, not a guarantee.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from asymml_jax import data as data_lib
from asymml_jax import train as train_lib
from asymml_jax.evaluation import gradient_attack as ga
from asymml_jax.evaluation import inversion
from asymml_jax.models import get_model
from experiments.attack_configs import (DEFAULT_CONFIGS, DP_CONFIG_MODULE, parse_configs,
                                        parse_names, plot_grid)
from experiments.attack_configs import DP as _DP
from experiments.attack_configs import RANK as _RANK

DEFAULT_CHANNELS = ",".join(ga.CHANNELS)

_WORKDIR = flags.DEFINE_string("workdir", "runs/attack_gradient", "Output folder.")
_CONFIGS = flags.DEFINE_string(
    "configs", DEFAULT_CONFIGS,
    "Comma-separated configurations: dense, asymml_r<k>, asymml_dp_eps<e>.")
_CHANNELS = flags.DEFINE_string("channels", DEFAULT_CHANNELS,
                                f"Comma-separated observation channels of {ga.CHANNELS}.")
_BATCH_SIZES = flags.DEFINE_string("batch_sizes", "1",
                                   "Comma-separated victim batch sizes (images per step).")
_NUM_VICTIM = flags.DEFINE_integer("num_victim", 4,
                                   "Victim images (the first held-out digits).")
_NUM_ATTACKER = flags.DEFINE_integer("num_attacker", 4000,
                                     "Attacker images (training digits; only for the "
                                     "prior_mean floor).")
_STEPS = flags.DEFINE_integer("steps", 400, "Adam steps on the dummy images.")
_LR = flags.DEFINE_float("learning_rate", 0.25, "Initial Adam step size (signed gradients).")
_TV = flags.DEFINE_float("tv_weight", 0.05, "Weight of the total-variation prior.")
_DY_WEIGHT = flags.DEFINE_float("output_gradient_weight", 0.2,
                                "Weight of each dY_R term in the residual distance.")
_RESTARTS = flags.DEFINE_integer("restarts", 1,
                                 "Dummy starts per victim batch (the best match is kept).")
_LABELS = flags.DEFINE_enum("labels", "known", list(ga.LABEL_MODES),
                            "Labels the attacker uses: known, or recovered (iDLG).")
_PRETRAIN = flags.DEFINE_integer("pretrain_steps", 100,
                                 "Dense Adam steps on the training split before the attack "
                                 "(0: weights at initialisation).")
_DP_STEPS = flags.DEFINE_integer("dp_steps", 210,
                                 "Training steps the DP noise is calibrated for.")
_WIDTH = flags.DEFINE_float("width", 0.25, "VGG11 channel multiplier.")
_SEED = flags.DEFINE_integer("seed", 0, "The one seed (weights, split, noise, dummies).")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttackSettings:
  """Everything the configurations share (validated).

  Attributes:
    num_victim: victim images, the first held-out digits.
    num_attacker: attacker images (training split; only the ``prior_mean`` floor).
    batch_sizes: victim images per observed step, one attack per entry.
    attack: the gradient-matching optimisation.
    pretrain_steps: dense Adam steps before the attack (``0``: init weights).
    dp_steps: steps the DP noise is calibrated for.
    width: VGG11 channel multiplier, in ``(0, 4]``.
    seed: the one seed, ``>= 0``.
  """

  num_victim: int = 4
  num_attacker: int = 4000
  batch_sizes: tuple[int, ...] = (1,)
  attack: ga.GradientAttackConfig = ga.GradientAttackConfig()
  pretrain_steps: int = 100
  dp_steps: int = 210
  width: float = 0.25
  seed: int = 0

  def __post_init__(self):
    for name in ("num_victim", "num_attacker", "dp_steps"):
      v = getattr(self, name)
      if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    for name in ("pretrain_steps", "seed"):
      v = getattr(self, name)
      if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if not 0 < self.width <= 4:
      raise ValueError(f"width must be in (0, 4], got {self.width}")
    if not isinstance(self.attack, ga.GradientAttackConfig):
      raise ValueError("attack must be a gradient_attack.GradientAttackConfig")
    bs = self.batch_sizes
    if (not isinstance(bs, tuple) or not bs or len(set(bs)) != len(bs)
        or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in bs)):
      raise ValueError(f"batch_sizes must be a non-empty tuple of distinct ints >= 1, got {bs!r}")
    if max(bs) > self.num_victim:
      raise ValueError(f"batch size {max(bs)} exceeds num_victim {self.num_victim}")


def _check_channel(part: str) -> None:
  if part not in ga.CHANNELS:
    raise ValueError(f"--channels: unknown channel {part!r}; use {', '.join(ga.CHANNELS)}")


def parse_channels(text: str) -> tuple[str, ...]:
  """``"weight_gradient,both"`` -> channel names, each checked; repeats refused."""
  return parse_names(text, "channels", _check_channel, "channel", DEFAULT_CHANNELS)


def parse_batch_sizes(text: str) -> tuple[int, ...]:
  """``"1,4"`` -> ``(1, 4)``; entries must be distinct ints >= 1."""
  out: list[int] = []
  for part in str(text).split(","):
    part = part.strip()
    if not part:
      continue
    if not part.isdigit() or int(part) < 1:
      raise ValueError(f"--batch_sizes: {part!r} is not an int >= 1")
    if int(part) in out:
      raise ValueError(f"--batch_sizes: {part} is listed twice")
    out.append(int(part))
  if not out:
    raise ValueError("--batch_sizes: give at least one batch size (e.g. 1)")
  return tuple(out)


def dp_train_config(epsilon: float, settings: AttackSettings) -> train_lib.TrainConfig:
  """``experiments/configs/mnist_dp.py`` at ``epsilon`` and the attack's width.

  The same derivation as ``experiments/attack_inversion.py`` (which cannot be
  imported here: both scripts define absl flags of the same names).
  """
  config = importlib.import_module(DP_CONFIG_MODULE).get_config()
  config.width = float(settings.width)
  config.backend = "inline"
  config.privacy.enabled = True
  config.privacy.noise_multiplier = 0.0
  config.privacy.target_epsilon = float(epsilon)
  return train_lib.TrainConfig.from_config(config)


def make_exposure(name: str, model, settings: AttackSettings, num_train: int
                  ) -> tuple[inversion.Exposure, float | None, dict[str, Any]]:
  """``(exposure, expected_batch_size, row fields)`` of a configuration name."""
  if name == "dense":
    return inversion.Exposure.dense(name), None, {
        "rank": None, "epsilon": math.inf, "noise_multiplier": 0.0, "clip": None}
  m_rank = _RANK.match(name)
  if m_rank:
    r = int(m_rank.group(1))
    return inversion.Exposure.fixed_rank(r, name), None, {
        "rank": r, "epsilon": math.inf, "noise_multiplier": 0.0, "clip": None}
  m_dp = _DP.match(name)
  if not m_dp:
    raise ValueError(f"unknown configuration {name!r}")
  cfg = dp_train_config(float(m_dp.group(1)), settings)
  exposure, dp = inversion.calibrated_dp_exposure(cfg, model, num_train, settings.dp_steps,
                                                  name=name)
  pc = dp.privacy
  return exposure, dp.expected_batch_size, {
      "rank": None, "rank_rule": dataclasses.asdict(cfg.decomposition),
      "epsilon": dp.epsilon(settings.dp_steps), "delta": pc.delta,
      "noise_multiplier": pc.noise_multiplier, "clip": pc.clip, "grad_clip": pc.grad_clip,
      "dp_steps": settings.dp_steps, "sampling_rate": dp.sampling_rate,
      "releases_per_step": dp.releases_per_step,
      "expected_batch_size": dp.expected_batch_size}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  head = (f"{'configuration':<16} {'channel':<16} {'B':>2} {'SSIM':>6} {'SSIM-u7':>8} "
          f"{'PSNR dB':>8} {'dist':>6} {'@truth':>6} {'sigma':>6} {'epsilon':>7}")
  lines = [head, "-" * len(head)]
  for r in rows:
    eps = r.get("epsilon", math.inf)
    lines.append(f"{r['name']:<16} {r['channel']:<16} {r['batch_size']:>2} {r['ssim']:>6.3f} "
                 f"{r['ssim_uniform7']:>8.3f} {r['psnr']:>8.2f} "
                 f"{r['final_distance']['total']:>6.3f} "
                 f"{r['distance_at_truth']['total']:>6.3f} "
                 f"{r.get('noise_multiplier', 0.0):>6.3f} "
                 f"{'inf' if math.isinf(eps) else f'{eps:.2f}':>7}")
  return "\n".join(lines)


def vgg11(image_shape: tuple[int, int, int], num_classes: int, width: float):
  """The attacked model: VGG11 with GroupNorm (as ``attack_inversion``)."""
  return get_model("vgg11", num_classes=num_classes, input_shape=image_shape, width=width,
                   norm="group")


def run_attack(*, configs: Sequence[str], channels: Sequence[str], workdir: str,
               settings: AttackSettings, log: Callable[[str], None] = print,
               make_model: Callable[..., Any] = vgg11) -> dict[str, Any]:
  """Runs every configuration, channel and batch size; writes the JSON table and PNG grid.

  Args:
    configs: configuration names (:func:`parse_configs`).
    channels: observation channels (:func:`parse_channels`).
    workdir: output folder.
    settings: the shared settings.
    log: progress sink.
    make_model: ``(image_shape, num_classes, width) -> StagedModel`` (VGG11;
      tests pass a smaller network).

  Returns:
    The table written to ``WORKDIR/attack_gradient.json``.
  """
  t0 = time.perf_counter()
  json_path = os.path.join(workdir, "attack_gradient.json")
  png_path = os.path.join(workdir, "attack_gradient.png")
  ds = data_lib.load_dataset("mnist5k")
  split = inversion.attack_split(ds, num_attacker=settings.num_attacker,
                                 num_victim=settings.num_victim,
                                 rng=np.random.default_rng([settings.seed, 5]))
  inversion.check_disjoint(ds, split)
  attacker = np.asarray(ds.train_images[split.attacker])
  victim = np.asarray(ds.test_images[split.victim])
  victim_labels = np.asarray(ds.test_labels[split.victim])
  low, high = float(attacker.min()), float(attacker.max())  # known to the attacker
  model = make_model(ds.image_shape, ds.num_classes, settings.width)
  root = jax.random.key(settings.seed)
  weight_key, attack_key = jax.random.split(root)
  variables = inversion.public_weights(
      model, weight_key, train_steps=settings.pretrain_steps, images=ds.train_images,
      labels=ds.train_labels, seed=settings.seed)
  log(f"victim {len(victim)} held-out digits in batches of {list(settings.batch_sizes)}; "
      f"attacker {len(attacker)} training digits (prior floor only; disjoint by csv row and "
      f"content); weights: init + {settings.pretrain_steps} dense steps; "
      f"{settings.attack.steps} matching steps, labels {settings.attack.labels} "
      f"({time.perf_counter() - t0:.0f} s)")
  baselines = inversion.prior_baselines(attacker, victim, low=low, high=high)
  table: dict[str, Any] = {
      "dataset": "mnist5k", "model": model.name, "width": settings.width, "data_range": [low, high],
      "settings": dataclasses.asdict(settings), "configs": list(configs),
      "channels": list(channels),
      "split": {"num_attacker": len(attacker), "num_victim": len(victim), "disjoint": True},
      "labels": settings.attack.labels,
      "ssim": "Wang et al. 2004 (Gaussian window sigma 1.5); ssim_uniform7: scikit-image "
              "default 7x7 uniform window",
      "baselines": baselines, "rows": []}
  pictures: list[tuple[str, np.ndarray]] = []
  n_show = len(victim)
  floor = max(baselines["prior_mean"]["ssim"], baselines["prior_blank"]["ssim"])

  def save():
    checks = {}
    for r in table["rows"]:
      key = f"{r['name']}/{r['channel']}/b{r['batch_size']}"
      checks[f"{key}_ssim_above_prior_floor"] = r["ssim"] > floor
    table["checks"] = checks
    table["wall_seconds"] = time.perf_counter() - t0
    train_lib.write_json_atomic(json_path, table)

  for i, name in enumerate(configs):
    exposure, expected, fields = make_exposure(name, model, settings, len(ds.train_images))
    for b in settings.batch_sizes:
      results = ga.run_gradient_attack(
          model, variables, exposure, victim, victim_labels, batch_size=b,
          channels=channels, config=settings.attack,
          key=jax.random.fold_in(jax.random.fold_in(attack_key, i), b), low=low, high=high,
          expected_batch_size=expected, log=log)
      for res in results:
        table["rows"].append({**res.to_dict(), "batch_size": b, **fields})
        shown = np.zeros((n_show, *victim.shape[1:]), np.float32) + low
        shown[:len(res.recons)] = res.recons[:n_show]
        pictures.append((f"{name}\n{res.channel}, B={b}\nSSIM {res.metrics['ssim']:.2f}",
                         shown))
    save()
    plot_grid(victim[:n_show], pictures, png_path, low=low, high=high,
              label_width=2.2, label_fontsize=7)
    log(f"[{i + 1}/{len(configs)}] {name} done ({time.perf_counter() - t0:.0f} s)")
  save()
  log(format_table(table["rows"]))
  log(f"no-information floor: SSIM {baselines['prior_mean']['ssim']:.3f} (mean image), "
      f"{baselines['prior_blank']['ssim']:.3f} (blank); PSNR "
      f"{baselines['prior_mean']['psnr']:.2f} / {baselines['prior_blank']['psnr']:.2f} dB")
  log(f"table: {json_path}\nfigure: {png_path}\ntotal: {table['wall_seconds']:.0f} s")
  return table


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    configs = parse_configs(_CONFIGS.value)
    channels = parse_channels(_CHANNELS.value)
    settings = AttackSettings(
        num_victim=_NUM_VICTIM.value, num_attacker=_NUM_ATTACKER.value,
        batch_sizes=parse_batch_sizes(_BATCH_SIZES.value),
        attack=ga.GradientAttackConfig(steps=_STEPS.value, learning_rate=_LR.value,
                                       tv_weight=_TV.value,
                                       output_gradient_weight=_DY_WEIGHT.value,
                                       restarts=_RESTARTS.value, labels=_LABELS.value),
        pretrain_steps=_PRETRAIN.value, dp_steps=_DP_STEPS.value, width=_WIDTH.value,
        seed=_SEED.value)
    run_attack(configs=configs, channels=channels, workdir=_WORKDIR.value,
               settings=settings, log=lambda line: print(line, flush=True))
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)

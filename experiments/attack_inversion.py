r"""Model-inversion attack on MNIST-5k: dense vs AsymML vs AsymML with DP.

Usage:

  python -m experiments.attack_inversion [--workdir=runs/attack_inversion] \
      [--configs=dense,asymml_r1,asymml_r2,asymml_r4,asymml_dp_eps8] \
      [--num_attacker=N] [--num_victim=M] [--epochs=E] [--decoder_features=F] \
      [--pretrain_steps=S] [--dp_steps=T] [--width=W] [--seed=K]

For every configuration, what the accelerator sees at the first split site of
VGG11 (``s1``: conv1 -> GroupNorm -> ReLU -> max pool, 16x16x16 at width 0.25;
the grayscale input itself never leaves under AsymML) is extracted with
:mod:`asymml_jax.evaluation.inversion`, a decoder is trained on the
attacker's images (a random subset of the 4,500 training digits) and scored
on the victim's (the 500 held-out digits) with SSIM and PSNR:

* ``dense``: the GPU-only baseline, the full activation leaves;
* ``asymml_r<k>``: AsymML with exactly ``k`` principal channels per sample kept
  in the enclave, the residual leaves in the clear (no clipping, no noise);
* ``asymml_dp_eps<e>``: AsymML with ``experiments/configs/mnist_dp.py``'s
  decomposition and release settings (clip 0.01, per-sample subspaces) and
  ``sigma`` calibrated, exactly as training calibrates it
  (:meth:`asymml_jax.train.DpRun.make`), to ``(e, 1e-5)``-DP over
  ``--dp_steps`` steps (default 210: the privacy sweep's 3 epochs, the
  smallest sigma, i.e. the strongest attack, of the 210-700-step runs).

All configurations share one set of public weights (:func:`inversion.public_weights`:
the model at init plus ``--pretrain_steps`` dense Adam steps on the training
split), one attacker/victim split (checked disjoint by source row and content
before anything runs) and one key per configuration.

Outputs: ``WORKDIR/attack_inversion.json`` (per configuration: SSIM as in
Wang et al. 2004, the scikit-image default ``ssim_uniform7``, PSNR, decoder
losses; plus the no-information floors ``prior_mean`` / ``prior_blank`` and
the issue's acceptance checks), rewritten after every configuration, and
``WORKDIR/attack_inversion.png`` (originals, then one row of reconstructions
per configuration).

Defaults (4,000 attacker / 500 victim digits, decoder of 32 channels trained
for 8 epochs, 100 dense pre-training steps, release batches of 250) take
about 5.5 minutes on a quiet 2-core CPU (about 1 minute per configuration,
seed 0).  Measured there (Wang SSIM / uniform-7 SSIM / PSNR dB):

  dense            0.978 / 0.979 / 31.4
  asymml_r1        0.973 / 0.973 / 30.1
  asymml_r2        0.967 / 0.968 / 29.2
  asymml_r4        0.951 / 0.953 / 28.2
  asymml_dp_eps8  -0.048 / -0.003 / 11.9   (sigma 1.695, clip 0.01)
  prior_mean       0.134 /  0.260 / 12.9   (no information: the mean image)
  prior_blank      0.208 /  0.382 / 10.8   (no information: blank background)

Without noise the residual at ``s1`` is as invertible as the full activation
(keeping 1-4 of 16 channels in the enclave removes little of the image); with
the DP noise of epsilon 8 the decoder learns nothing (it fits the noise and
scores below the no-information floor).  Note that under the scikit-image
default window even the no-information floor (0.26 / 0.38) is above 0.2:
matching black background counts as similarity.
"""

from __future__ import annotations

import dataclasses
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
from asymml_jax.evaluation import inversion
from asymml_jax.models import get_model
from experiments.attack_configs import DEFAULT_CONFIGS, DP_CONFIG_MODULE, parse_configs, plot_grid
from experiments.attack_configs import DP as _DP
from experiments.attack_configs import RANK as _RANK

ACCEPT_DENSE_SSIM = 0.6  # the attack must be strong enough to mean something
GOAL_DP_SSIM = 0.2       # the goal for AsymML with DP at epsilon 8

_WORKDIR = flags.DEFINE_string("workdir", "runs/attack_inversion", "Output folder.")
_CONFIGS = flags.DEFINE_string(
    "configs", DEFAULT_CONFIGS,
    "Comma-separated configurations: dense, asymml_r<k>, asymml_dp_eps<e>.")
_NUM_ATTACKER = flags.DEFINE_integer("num_attacker", 4000,
                                     "Attacker images (from the 4,500 training digits).")
_NUM_VICTIM = flags.DEFINE_integer("num_victim", 500,
                                   "Victim images (from the 500 held-out digits).")
_EPOCHS = flags.DEFINE_integer("epochs", 8, "Decoder training epochs.")
_FEATURES = flags.DEFINE_integer("decoder_features", 32, "Decoder channels.")
_DECODER_BATCH = flags.DEFINE_integer("decoder_batch_size", 64, "Decoder batch size.")
_LR = flags.DEFINE_float("learning_rate", 2e-3, "Decoder Adam learning rate.")
_PRETRAIN = flags.DEFINE_integer("pretrain_steps", 100,
                                 "Dense Adam steps on the training split before the attack "
                                 "(0: weights at initialisation).")
_DP_STEPS = flags.DEFINE_integer("dp_steps", 210,
                                 "Training steps the DP noise is calibrated for.")
_WIDTH = flags.DEFINE_float("width", 0.25, "VGG11 channel multiplier.")
_SEED = flags.DEFINE_integer("seed", 0, "The one seed (weights, split, noise, decoder).")
_EXAMPLES = flags.DEFINE_integer("num_examples", 8, "Victim images shown in the PNG.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttackSettings:
  """Everything the configurations share (validated).

  Attributes:
    num_attacker: attacker images, from the training split.
    num_victim: victim images, from the held-out split.
    decoder: the decoder's architecture and training.
    pretrain_steps: dense Adam steps before the attack (``0``: init weights).
    dp_steps: steps the DP noise is calibrated for.
    width: VGG11 channel multiplier, in ``(0, 4]``.
    seed: the one seed, ``>= 0``.
    release_batch: rows per release batch.
    num_examples: reconstructions shown per configuration.
  """

  num_attacker: int = 4000
  num_victim: int = 500
  decoder: inversion.DecoderConfig = inversion.DecoderConfig(features=32, epochs=8)
  pretrain_steps: int = 100
  dp_steps: int = 210
  width: float = 0.25
  seed: int = 0
  release_batch: int = 250
  num_examples: int = 8

  def __post_init__(self):
    for name in ("num_attacker", "num_victim", "dp_steps", "release_batch", "num_examples"):
      v = getattr(self, name)
      if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    for name in ("pretrain_steps", "seed"):
      v = getattr(self, name)
      if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if not 0 < self.width <= 4:
      raise ValueError(f"width must be in (0, 4], got {self.width}")
    if not isinstance(self.decoder, inversion.DecoderConfig):
      raise ValueError("decoder must be an inversion.DecoderConfig")


def dp_train_config(epsilon: float, settings: AttackSettings) -> train_lib.TrainConfig:
  """``experiments/configs/mnist_dp.py`` at ``epsilon`` and the attack's width."""
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(DP_CONFIG_MODULE).get_config()
  config.width = float(settings.width)
  config.backend = "inline"
  config.privacy.enabled = True
  config.privacy.noise_multiplier = 0.0
  config.privacy.target_epsilon = float(epsilon)
  return train_lib.TrainConfig.from_config(config)


def make_exposure(name: str, model, settings: AttackSettings,
                  num_train: int) -> tuple[inversion.Exposure, dict[str, Any]]:
  """The :class:`inversion.Exposure` of a configuration name and its row fields."""
  if name == "dense":
    return inversion.Exposure.dense(name), {"rank": None, "epsilon": math.inf,
                                            "noise_multiplier": 0.0, "clip": None}
  m_rank = _RANK.match(name)
  if m_rank:
    r = int(m_rank.group(1))
    return inversion.Exposure.fixed_rank(r, name), {
        "rank": r, "epsilon": math.inf, "noise_multiplier": 0.0, "clip": None}
  m_dp = _DP.match(name)
  if not m_dp:
    raise ValueError(f"unknown configuration {name!r}")
  cfg = dp_train_config(float(m_dp.group(1)), settings)
  exposure, dp = inversion.calibrated_dp_exposure(cfg, model, num_train, settings.dp_steps,
                                                  name=name)
  pc = dp.privacy
  return exposure, {"rank": None, "rank_rule": dataclasses.asdict(cfg.decomposition),
                    "epsilon": dp.epsilon(settings.dp_steps), "delta": pc.delta,
                    "noise_multiplier": pc.noise_multiplier, "clip": pc.clip,
                    "dp_steps": settings.dp_steps, "sampling_rate": dp.sampling_rate,
                    "releases_per_step": dp.releases_per_step}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  head = (f"{'configuration':<18} {'SSIM':>6} {'SSIM-u7':>8} {'PSNR dB':>8} {'sigma':>7} "
          f"{'epsilon':>8} {'seconds':>8}")
  lines = [head, "-" * len(head)]
  for r in rows:
    eps = r.get("epsilon", math.inf)
    lines.append(f"{r['name']:<18} {r['ssim']:>6.3f} {r['ssim_uniform7']:>8.3f} "
                 f"{r['psnr']:>8.2f} {r.get('noise_multiplier', 0.0):>7.3f} "
                 f"{'inf' if math.isinf(eps) else f'{eps:.3f}':>8} "
                 f"{r.get('seconds', 0.0):>8.0f}")
  return "\n".join(lines)


def run_attack(*, configs: Sequence[str], workdir: str, settings: AttackSettings,
               log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs every configuration and writes the JSON table and the PNG grid.

  Returns:
    The table written to ``WORKDIR/attack_inversion.json``.
  """
  t0 = time.perf_counter()
  json_path = os.path.join(workdir, "attack_inversion.json")
  png_path = os.path.join(workdir, "attack_inversion.png")
  ds = data_lib.load_dataset("mnist5k")
  split = inversion.attack_split(ds, num_attacker=settings.num_attacker,
                                 num_victim=settings.num_victim,
                                 rng=np.random.default_rng([settings.seed, 5]))
  inversion.check_disjoint(ds, split)
  attacker = np.asarray(ds.train_images[split.attacker])
  victim = np.asarray(ds.test_images[split.victim])
  low, high = float(attacker.min()), float(attacker.max())  # known to the attacker
  model = get_model("vgg11", num_classes=ds.num_classes, input_shape=ds.image_shape,
                    width=settings.width, norm="group")
  root = jax.random.key(settings.seed)
  weight_key, attack_key = jax.random.split(root)
  variables = inversion.public_weights(
      model, weight_key, train_steps=settings.pretrain_steps, images=ds.train_images,
      labels=ds.train_labels, seed=settings.seed)
  site = inversion.attacked_site(model)
  log(f"attacker {len(attacker)} training digits, victim {len(victim)} held-out digits "
      f"(disjoint by csv row and content); site {site} {model.site_shapes[site]}; weights: "
      f"init + {settings.pretrain_steps} dense steps ({time.perf_counter() - t0:.0f} s)")
  baselines = inversion.prior_baselines(attacker, victim, low=low, high=high)
  table: dict[str, Any] = {
      "dataset": "mnist5k", "model": "vgg11", "site": site,
      "site_shape": list(model.site_shapes[site]), "data_range": [low, high],
      "settings": dataclasses.asdict(settings), "configs": list(configs),
      "split": {"num_attacker": len(attacker), "num_victim": len(victim), "disjoint": True},
      "ssim": "Wang et al. 2004 (Gaussian window sigma 1.5); ssim_uniform7: scikit-image "
              "default 7x7 uniform window",
      "baselines": baselines, "rows": []}
  pictures: list[tuple[str, np.ndarray]] = []

  def save():
    rows = {r["name"]: r for r in table["rows"]}
    checks = {}
    if "dense" in rows:
      checks["dense_ssim_at_least_0.6"] = rows["dense"]["ssim"] >= ACCEPT_DENSE_SSIM
    dp_rows = [r for n, r in rows.items() if _DP.match(n)]
    for r in dp_rows:
      checks[f"{r['name']}_ssim_below_0.2"] = r["ssim"] < GOAL_DP_SSIM
      # An attacker may also ignore the release and output its mean image.
      checks[f"{r['name']}_best_of_decoder_and_prior_below_0.2"] = max(
          r["ssim"], baselines["prior_mean"]["ssim"]) < GOAL_DP_SSIM
    table["checks"] = checks
    table["wall_seconds"] = time.perf_counter() - t0
    train_lib.write_json_atomic(json_path, table)

  for i, name in enumerate(configs):
    exposure, fields = make_exposure(name, model, settings, len(ds.train_images))
    result = inversion.run_inversion(
        model, variables, exposure, attacker, victim, decoder=settings.decoder,
        key=jax.random.fold_in(attack_key, i), batch_size=settings.release_batch,
        low=low, high=high, num_examples=settings.num_examples, log=log)
    table["rows"].append({**result.to_dict(), **fields})
    pictures.append((f"{name}\nSSIM {result.metrics['ssim']:.2f}", result.examples))
    save()
  plot_grid(victim[:settings.num_examples], pictures, png_path, low=low, high=high)
  save()
  log(format_table(table["rows"]))
  log(f"no-information floor: SSIM {baselines['prior_mean']['ssim']:.3f} (mean image), "
      f"{baselines['prior_blank']['ssim']:.3f} (blank)")
  log(f"checks: {table['checks']}")
  log(f"table: {json_path}\nfigure: {png_path}\ntotal: {table['wall_seconds']:.0f} s")
  return table


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  try:
    configs = parse_configs(_CONFIGS.value)
    settings = AttackSettings(
        num_attacker=_NUM_ATTACKER.value, num_victim=_NUM_VICTIM.value,
        decoder=inversion.DecoderConfig(features=_FEATURES.value, epochs=_EPOCHS.value,
                                        batch_size=_DECODER_BATCH.value,
                                        learning_rate=_LR.value),
        pretrain_steps=_PRETRAIN.value, dp_steps=_DP_STEPS.value, width=_WIDTH.value,
        seed=_SEED.value, num_examples=_EXAMPLES.value)
    run_attack(configs=configs, workdir=_WORKDIR.value, settings=settings,
               log=lambda line: print(line, flush=True))
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)

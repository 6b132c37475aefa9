"""DP-SGD baseline (Abadi et al. 2016, "Deep Learning with Differential Privacy").

The comparison point of issue 4: the same staged model (run whole on the
untrusted device, a dense plan), the same data and the same accounting
(:mod:`asymml_jax.privacy.accounting`) as AsymML's DP mode, but privacy comes
from noising the *weight gradient* instead of the residuals that leave the
enclave.  One step is Algorithm 1 of the paper:

* Poisson sampling: each of the ``N`` training examples joins the batch
  independently with probability ``q = B / N`` (``B`` the *expected* batch
  size), via :func:`asymml_jax.data.poisson_batch`; the batch is padded to a
  fixed size (mask 0), so the jitted step never recompiles;
* per-example gradients ``g_i = grad L(theta; x_i)``: ``jax.vmap(jax.grad)``
  over the batch, each example a batch of one through
  :func:`asymml_jax.stages.inline_loss`; padding rows contribute ``0``;
* per-example clipping ``g_i <- g_i * min(1, C / ||g_i||_2)`` with the global
  L2 norm over all parameters (``optax.per_example_global_norm_clip``);
* noise: ``g = (sum_i g_i + N(0, (sigma C)^2 I)) / B``, divided by the
  *expected* batch size ``B`` (not the realised count, which depends on the
  private data); the noise key of step ``t`` is ``fold_in(noise_key, t)``;
* the optax update (:func:`asymml_jax.train.make_optimizer`).

Accounting: each step is ``PoissonSampled(q, Gaussian(sigma))`` with one
release per step (sensitivity ``C`` of the clipped sum, noise ``sigma C``),
composed over the steps with the PLD accountant; ``sigma`` is calibrated up
front from a target ``(epsilon, delta)`` when one is given.

Randomness: one seed; ``jax.random.key(seed)`` is split once into the
initialisation, model and noise keys; the batch of step ``t`` is a pure
function of ``(seed, t)`` (DESIGN section 11).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asymml_jax import backends as bk
from asymml_jax import data as data_lib
from asymml_jax import stages as st
from asymml_jax import train as train_lib
from asymml_jax.models import MODELS, StagedModel, get_model
from asymml_jax.plan import Plan, make_plan
from asymml_jax.privacy import accounting
from asymml_jax.privacy.config import PER_SAMPLE_NORMS

Tree = Any

# DP-SGD releases one noised sum per step: L = 1 in the accountant's terms.
RELEASES_PER_STEP = 1


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpSgdConfig:
  """Validated DP-SGD settings (DESIGN sections 7 and 11).

  Every field is checked at construction; a value outside its range raises
  ``ValueError`` naming the field.  The rules that need the data-set size
  (``batch_size <= N``, ``delta < 1/N``) are checked by :meth:`validate_for`.

  Attributes:
    model: model name (:data:`asymml_jax.models.MODELS`).
    width: channel multiplier, in ``(0, 4]``.
    norm: ``"group"`` or ``"none"``; ``"batch"`` is refused (BatchNorm mixes
      samples, so one example's clipped gradient would not bound its
      influence).
    dataset: data-set name (:data:`asymml_jax.data.DATASET_NAMES`).
    data_dir: data directory for the data sets read from local files.
    batch_size: the *expected* Poisson batch size ``B = q N``.
    num_epochs: training length in epochs of ``N // B`` steps.
    max_steps: cap on the number of steps (``0``: none).
    optimizer: ``"adam"`` (AdamW) or ``"sgd"`` (Nesterov momentum), as in
      :class:`asymml_jax.train.TrainConfig`.
    learning_rate: peak learning rate of the warm-up + cosine schedule.
    warmup_steps: linear warm-up steps.
    weight_decay: decoupled weight decay, in ``[0, 1)``.
    l2_clip: per-example gradient L2 bound ``C > 0``.
    noise_multiplier: ``sigma >= 0``; noise std ``sigma C``.  ``0`` with no
      ``target_epsilon`` trains with clipping only (``epsilon = inf``).
    target_epsilon: if set, ``sigma`` is calibrated from it up front; leave
      ``noise_multiplier`` at ``0`` then.
    delta: the ``delta`` of ``(epsilon, delta)``, ``< 1/N``.
    seed: the one seed of the run.
    log_every: steps between progress lines.
    eval_batch_size: batch size of the held-out evaluation.
  """

  model: str = "vgg11"
  width: float = 0.25
  norm: str = "group"
  dataset: str = "mnist5k"
  data_dir: str = ""
  batch_size: int = 64
  num_epochs: float = 10.0
  max_steps: int = 0
  optimizer: str = "adam"
  learning_rate: float = 2e-3
  warmup_steps: int = 50
  weight_decay: float = 1e-4
  l2_clip: float = 1.0
  noise_multiplier: float = 0.0
  target_epsilon: float | None = None
  delta: float = 1e-5
  seed: int = 0
  log_every: int = 50
  eval_batch_size: int = 250

  def __post_init__(self):
    def need(cond: bool, msg: str):
      if not cond:
        raise ValueError(f"dpsgd config: {msg}")

    need(self.model in MODELS, f"model must be one of {sorted(MODELS)}, got {self.model!r}")
    need(_is_real(self.width) and 0 < self.width <= 4,
         f"width must be in (0, 4], got {self.width!r}")
    need(self.norm != "batch",
         "norm='batch' is not allowed with DP-SGD: BatchNorm mixes samples: one "
         "example's gradient would depend on the others (batch mean and "
         "variance), so clipping it would no longer bound that example's "
         "influence; use norm='group'")
    need(self.norm in PER_SAMPLE_NORMS,
         f"norm must be one of {PER_SAMPLE_NORMS} (normalisations that act on one "
         f"sample at a time), got {self.norm!r}")
    need(self.dataset in data_lib.DATASET_NAMES,
         f"dataset must be one of {data_lib.DATASET_NAMES}, got {self.dataset!r}")
    need(_is_int(self.batch_size) and 1 <= self.batch_size <= 65536,
         f"batch_size (the expected Poisson batch size) must be an int in [1, 65536], "
         f"got {self.batch_size!r}")
    need(_is_real(self.num_epochs) and 0 < self.num_epochs <= 10000,
         f"num_epochs must be in (0, 10000], got {self.num_epochs!r}")
    need(_is_int(self.max_steps) and self.max_steps >= 0,
         f"max_steps must be an int >= 0, got {self.max_steps!r}")
    need(self.optimizer in train_lib.OPTIMIZERS,
         f"optimizer must be one of {train_lib.OPTIMIZERS}, got {self.optimizer!r}")
    need(_is_real(self.learning_rate) and 0 < self.learning_rate <= 10,
         f"learning_rate must be in (0, 10], got {self.learning_rate!r}")
    need(_is_int(self.warmup_steps) and self.warmup_steps >= 0,
         f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
    need(_is_real(self.weight_decay) and 0 <= self.weight_decay < 1,
         f"weight_decay must be in [0, 1), got {self.weight_decay!r}")
    need(_is_real(self.l2_clip) and math.isfinite(self.l2_clip) and self.l2_clip > 0,
         f"l2_clip must be a finite number > 0, got {self.l2_clip!r}: it is the "
         "L2 sensitivity of one example's gradient, and the noise std is "
         "noise_multiplier * l2_clip")
    need(_is_real(self.noise_multiplier) and math.isfinite(self.noise_multiplier)
         and self.noise_multiplier >= 0,
         f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}")
    if self.target_epsilon is not None:
      need(_is_real(self.target_epsilon) and math.isfinite(self.target_epsilon)
           and self.target_epsilon > 0,
           f"target_epsilon must be a finite number > 0 (or None), got "
           f"{self.target_epsilon!r}")
      need(self.noise_multiplier == 0,
           f"set either noise_multiplier ({self.noise_multiplier}) or target_epsilon "
           f"({self.target_epsilon}), not both: with a target the noise multiplier "
           "is calibrated from it")
    need(_is_real(self.delta) and 0 < self.delta < 1,
         f"delta must be in (0, 1), got {self.delta!r}")
    need(_is_int(self.seed) and self.seed >= 0, f"seed must be an int >= 0, got {self.seed!r}")
    need(_is_int(self.log_every) and self.log_every >= 1,
         f"log_every must be an int >= 1, got {self.log_every!r}")
    need(_is_int(self.eval_batch_size) and self.eval_batch_size >= 1,
         f"eval_batch_size must be an int >= 1, got {self.eval_batch_size!r}")

  def validate_for(self, num_examples: int) -> None:
    """Checks the rules that depend on the number ``N`` of training examples.

    Args:
      num_examples: ``N``.

    Raises:
      ValueError: ``batch_size > N`` or ``delta >= 1/N``.
    """
    if not (_is_int(num_examples) and num_examples >= 1):
      raise ValueError(f"dpsgd config: num_examples must be an int >= 1, got {num_examples!r}")
    if self.batch_size > num_examples:
      raise ValueError(f"dpsgd config: batch_size {self.batch_size} exceeds the "
                       f"{num_examples} training examples")
    if not self.delta < 1.0 / num_examples:
      raise ValueError(
          f"dpsgd config: delta must be < 1/N = {1.0 / num_examples:.3g} (N = "
          f"{num_examples} examples), got delta = {self.delta:g}: a mechanism that "
          "publishes a random example in the clear is (0, 1/N)-DP, so delta >= 1/N "
          "promises nothing")

  def total_steps(self, num_examples: int) -> int:
    """Training steps: ``ceil(num_epochs * (N // B))``, capped by ``max_steps``.

    The same epoch length as :func:`asymml_jax.train.train_and_evaluate`.
    """
    steps = max(1, int(math.ceil(self.num_epochs * (num_examples // self.batch_size))))
    return min(steps, self.max_steps) if self.max_steps else steps

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "DpSgdConfig":
    """Builds from a dict or ``ml_collections.ConfigDict``; unknown keys are errors."""
    cfg = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(cfg) - known)
    if extra:
      raise ValueError(f"dpsgd config: unknown keys {extra}; known: {sorted(known)}")
    return cls(**cfg)


def dense_plan(model: StagedModel) -> Plan:
  """The plan DP-SGD runs: every layer on the untrusted device, nothing decomposed."""
  return make_plan(model, 1, force="dense")


def per_example_grads(model: StagedModel, plan: Plan, params: Tree, stats: Tree,
                      batch: Mapping[str, jax.Array], key: jax.Array,
                      step: jax.Array) -> tuple[Tree, dict]:
  """Per-example gradients ``g_i = grad L(theta; x_i)`` (Abadi et al. 2016, Alg. 1).

  ``jax.vmap(jax.grad(...))`` over the batch; each example goes through
  :func:`asymml_jax.stages.inline_loss` as a batch of one, so its loss (and
  gradient) is ``0`` when its mask is ``0``.

  Args:
    model: the staged model (per-sample normalisation).
    plan: its (dense) plan.
    params: the weights.
    stats: the normalisation state (unchanged by per-sample norms).
    batch: ``image (B, H, W, C)``, ``label (B,)``, ``mask (B,)``.
    key: the model's key (``inline_loss`` folds in ``step``).
    step: the step number.

  Returns:
    ``(grads, metrics)``: ``grads`` has ``params``' structure with a leading
    batch axis; ``metrics`` are ``loss_sum``, ``correct`` and ``count`` per
    example, shape ``(B,)``.
  """
  def loss_one(p, example):
    one = jax.tree.map(lambda x: x[None], example)
    loss, (_, metrics) = st.inline_loss(model, plan, p, stats, one, key, step, True)
    return loss, metrics

  return jax.vmap(jax.grad(loss_one, has_aux=True), in_axes=(None, 0))(params, dict(batch))


def privatize(grads: Tree, mask: jax.Array, *, l2_clip: jax.Array,
              noise_multiplier: jax.Array, expected_batch_size: jax.Array,
              key: jax.Array) -> tuple[Tree, jax.Array]:
  """Clip, sum, noise and scale per-example gradients (Abadi et al. 2016, Alg. 1).

  ``g = (sum_i m_i g_i min(1, C / ||g_i||_2) + N(0, (sigma C)^2 I)) / B``
  with the global L2 norm over all leaves, ``m_i`` the mask (padding rows
  contribute ``0``) and ``B`` the expected batch size.

  Args:
    grads: per-example gradients (leading batch axis on every leaf).
    mask: ``(B,)``, ``1`` for real examples and ``0`` for padding.
    l2_clip: ``C``.
    noise_multiplier: ``sigma``.
    expected_batch_size: ``B = q N``.
    key: the noise key of this step (fresh every step).

  Returns:
    ``(noisy mean gradient, number of examples whose gradient was clipped)``.
  """
  leaves, treedef = jax.tree.flatten(grads)
  keep = mask > 0
  leaves = [jnp.where(keep.reshape((-1,) + (1,) * (g.ndim - 1)), g, jnp.zeros_like(g))
            for g in leaves]
  summed, num_clipped = optax.per_example_global_norm_clip(leaves, l2_clip)
  # One draw for all parameters, cut into the leaves (one RNG call compiles
  # much faster than one per leaf).
  sizes = [s.size for s in summed]
  noise = jax.random.normal(key, (sum(sizes),), jnp.float32) * (noise_multiplier * l2_clip)
  offsets = np.cumsum([0] + sizes)
  noisy = [(s + noise[a:b].reshape(s.shape).astype(s.dtype)) / expected_batch_size
           for s, a, b in zip(summed, offsets[:-1], offsets[1:])]
  return jax.tree.unflatten(treedef, noisy), num_clipped


def step_hyper(l2_clip: float, noise_multiplier: float, expected_batch_size: float) -> dict:
  """The traced scalars of a step: ``C``, ``sigma`` and ``B`` (changing them never recompiles)."""
  return {"l2_clip": jnp.float32(l2_clip), "noise_multiplier": jnp.float32(noise_multiplier),
          "expected_batch_size": jnp.float32(expected_batch_size)}


def make_private_grad_fn(model: StagedModel) -> Callable:
  """Jitted DP-SGD gradient of one step.

  Returns:
    ``private_grad(params, stats, batch, model_key, noise_key, step, hyper)
    -> (grads, metrics)``, ``hyper`` a dict of float scalars ``l2_clip``,
    ``noise_multiplier``, ``expected_batch_size`` (traced: changing them does
    not recompile).  The noise key is ``fold_in(noise_key, step)``.  Metrics
    are batch sums ``loss_sum``, ``correct``, ``count`` and ``num_clipped``.
  """
  plan = dense_plan(model)

  @jax.jit
  def private_grad(params, stats, batch, model_key, noise_key, step, hyper):
    grads, per_ex = per_example_grads(model, plan, params, stats, batch, model_key, step)
    noisy, num_clipped = privatize(
        grads, batch["mask"], l2_clip=hyper["l2_clip"],
        noise_multiplier=hyper["noise_multiplier"],
        expected_batch_size=hyper["expected_batch_size"],
        key=jax.random.fold_in(noise_key, step))
    metrics = {k: jnp.sum(v) for k, v in per_ex.items()}
    metrics["num_clipped"] = num_clipped
    return noisy, metrics

  return private_grad


def make_train_step(model: StagedModel, tx: optax.GradientTransformation) -> Callable:
  """One jitted DP-SGD step: private gradient and optax update.

  Returns:
    ``train_step(state, batch, model_key, noise_key, hyper) -> (state,
    metrics)``; the step number is ``state.step`` (the host step count), and
    the normalisation state is unchanged (per-sample norms keep none).
  """
  plan = dense_plan(model)

  @jax.jit
  def train_step(state: train_lib.TrainState, batch, model_key, noise_key, hyper):
    step = state.step
    grads, per_ex = per_example_grads(model, plan, state.params, state.batch_stats, batch,
                                      model_key, step)
    noisy, num_clipped = privatize(
        grads, batch["mask"], l2_clip=hyper["l2_clip"],
        noise_multiplier=hyper["noise_multiplier"],
        expected_batch_size=hyper["expected_batch_size"],
        key=jax.random.fold_in(noise_key, step))
    updates, opt_state = tx.update(noisy, state.opt_state, state.params)
    new_state = state.replace(step=step + 1,
                              params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    metrics = {k: jnp.sum(v) for k, v in per_ex.items()}
    metrics["num_clipped"] = num_clipped
    return new_state, metrics

  return train_step


def split_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(init_key, model_key, noise_key)``: ``jax.random.key(seed)`` split once."""
  init_key, model_key, noise_key = jax.random.split(jax.random.key(seed), 3)
  return init_key, model_key, noise_key


def resolve_noise_multiplier(cfg: DpSgdConfig, *, sampling_rate: float, steps: int) -> float:
  """``sigma``: ``cfg.noise_multiplier``, or calibrated from ``cfg.target_epsilon``."""
  if cfg.target_epsilon is None:
    return float(cfg.noise_multiplier)
  return accounting.calibrate_noise_multiplier(
      target_epsilon=cfg.target_epsilon, delta=cfg.delta, sampling_rate=sampling_rate,
      steps=steps, releases_per_step=RELEASES_PER_STEP)


def run_epsilon(noise_multiplier: float, *, sampling_rate: float, steps: int,
                delta: float) -> float:
  """Epsilon of ``steps`` DP-SGD steps (``inf`` without noise)."""
  return accounting.epsilon(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate,
                            steps=steps, releases_per_step=RELEASES_PER_STEP, delta=delta)


def train_dpsgd(cfg: DpSgdConfig, workdir: str | None = None, *,
                log: Callable[[str], None] = print,
                dataset: data_lib.Dataset | None = None) -> dict[str, Any]:
  """Trains with DP-SGD, evaluates on the held-out split, returns the summary.

  Args:
    cfg: the settings.
    workdir: if given, the summary is written atomically to
      ``workdir/summary.json``.
    log: where progress lines go (step, loss, train accuracy, epsilon so far,
      examples/s).
    dataset: an already loaded data set (default: ``load_dataset(cfg.dataset,
      cfg.data_dir)``).

  Returns:
    The summary: ``method`` (``"dpsgd"``), ``model``, ``test_accuracy``,
    ``epsilon`` (``inf`` without noise), ``delta``, ``noise_multiplier``,
    ``l2_clip``, ``sampling_rate``, ``steps``, ``batch_size``,
    ``wall_seconds``, ``poisson_truncated_steps`` and more.

  Raises:
    ValueError: settings that do not fit the data set (``validate_for``).
    FloatingPointError: a non-finite loss.
  """
  t_start = time.perf_counter()
  ds = dataset if dataset is not None else data_lib.load_dataset(
      cfg.dataset, cfg.data_dir or None)
  n = int(len(ds.train_labels))
  cfg.validate_for(n)
  steps = cfg.total_steps(n)
  q = cfg.batch_size / n
  sigma = resolve_noise_multiplier(cfg, sampling_rate=q, steps=steps)
  eps_run = run_epsilon(sigma, sampling_rate=q, steps=steps, delta=cfg.delta)

  model = get_model(cfg.model, num_classes=ds.num_classes, input_shape=ds.image_shape,
                    width=cfg.width, norm=cfg.norm)
  init_key, model_key, noise_key = split_keys(cfg.seed)
  opt_cfg = train_lib.TrainConfig(optimizer=cfg.optimizer, learning_rate=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay,
                                  warmup_steps=cfg.warmup_steps)
  tx = train_lib.make_optimizer(opt_cfg, steps)
  state = train_lib.create_state(model, tx, init_key)
  train_step = make_train_step(model, tx)
  hyper = step_hyper(cfg.l2_clip, sigma, cfg.batch_size)
  max_batch = data_lib.poisson_max_batch(cfg.batch_size, n)
  log(f"dpsgd: {cfg.model} (width {cfg.width}, norm {cfg.norm}) on {ds.name} ({n} examples): "
      f"{steps} steps, Poisson q = {q:.5f} (expected batch {cfg.batch_size}, padded to "
      f"{max_batch}), clip {cfg.l2_clip:g}, sigma {sigma:.4f} -> epsilon {eps_run:.3f} at "
      f"delta {cfg.delta:g}")

  truncated_steps = 0
  t_window, window = time.perf_counter(), []
  t_train = time.perf_counter()
  for step in range(steps):
    batch, truncated = data_lib.poisson_batch(ds.train_images, ds.train_labels,
                                              cfg.batch_size, seed=cfg.seed, step=step)
    truncated_steps += int(truncated)
    state, metrics = train_step(state, batch, model_key, noise_key, hyper)
    m = {k: float(v) for k, v in metrics.items()}
    window.append(m)
    if not np.isfinite(m["loss_sum"]):
      raise FloatingPointError(f"loss became {m['loss_sum']} at step {step}")
    done = step + 1
    if done % cfg.log_every == 0 or done == steps:
      dt = time.perf_counter() - t_window
      count = sum(w["count"] for w in window)
      loss = sum(w["loss_sum"] for w in window) / max(count, 1.0)
      acc = sum(w["correct"] for w in window) / max(count, 1.0)
      clipped = sum(w["num_clipped"] for w in window) / max(count, 1.0)
      eps_now = run_epsilon(sigma, sampling_rate=q, steps=done, delta=cfg.delta)
      log(f"step {done}/{steps}  loss {loss:.4f}  train_acc {acc:.4f}  "
          f"epsilon {eps_now:.3f}  clipped {clipped:.2f}  "
          f"{count / max(dt, 1e-9):.1f} examples/s")
      t_window, window = time.perf_counter(), []
  train_seconds = time.perf_counter() - t_train

  backend = bk.make_backend("dense", model, key=model_key, batch_size=cfg.eval_batch_size)
  with backend:
    ev = train_lib.evaluate(backend, state, ds.test_images, ds.test_labels,
                            cfg.eval_batch_size)
  summary = {
      "method": "dpsgd",
      "model": cfg.model,
      "width": cfg.width,
      "norm": cfg.norm,
      "dataset": ds.name,
      "test_accuracy": ev["accuracy"],
      "test_loss": ev["loss"],
      "test_examples": ev["count"],
      "epsilon": float(eps_run),
      "target_epsilon": cfg.target_epsilon,
      "delta": cfg.delta,
      "noise_multiplier": float(sigma),
      "l2_clip": cfg.l2_clip,
      "sampling_rate": q,
      "steps": int(steps),
      "batch_size": cfg.batch_size,
      "padded_batch_size": max_batch,
      "poisson_truncated_steps": truncated_steps,
      "train_seconds": train_seconds,
      "wall_seconds": time.perf_counter() - t_start,
      "config": dataclasses.asdict(cfg),
  }
  if workdir is not None:
    train_lib.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  log(f"dpsgd: test_accuracy {ev['accuracy']:.4f} on {ev['count']} held-out examples, "
      f"epsilon {eps_run:.3f} (delta {cfg.delta:g}), {summary['wall_seconds']:.1f} s")
  return summary

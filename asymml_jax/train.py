"""Training and evaluation loop: TrainState, steps, checkpoints, summary (DESIGN section 4).

``train_and_evaluate(config, workdir)`` trains a staged model through any
backend (``dense``, ``inline``, ``local``; ``enclave`` and ``tee_only`` once
``enclave_bridge`` is imported), checkpoints with orbax every
``checkpoint_every`` steps (atomically; a rerun with the same workdir resumes
from the latest checkpoint, also after Ctrl-C), logs a line every
``log_every`` steps (step, loss, accuracy, examples/s), evaluates on the
held-out split and writes ``WORKDIR/summary.json`` atomically.

Randomness: one seed, split once into an init key and the trusted key; the
data order is a pure function of ``(seed, step)`` and each step's trusted key
is ``fold_in(trusted_key, step)``, so a resumed run repeats the exact batches
and decompositions of an uninterrupted one.

Several processes (DESIGN section 10; ``group`` from
:func:`asymml_jax.distributed.initialize`): each trains on its own data shard
(its own enclave's sealed shard, or shard ``i`` of ``n`` of the data set for
the in-process backends) with ``batch_size`` the *global* batch; gradients,
batch statistics and metrics are averaged across processes by XLA every step,
so all apply the same update; the privacy accounting uses the global sampling
rate; process 0 alone writes checkpoints and ``summary.json`` and, on a
restart, broadcasts the restored state; a failure anywhere stops every
process (:mod:`asymml_jax.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from asymml_jax import backends as bk
from asymml_jax import checkpoints
from asymml_jax import data as data_lib
from asymml_jax import distributed as dist
from asymml_jax import faults
from asymml_jax import parallel
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.layers import NORMS
from asymml_jax.models import MODELS, get_model
from asymml_jax.privacy import accounting
from asymml_jax.privacy.config import PrivacyConfig

OPTIMIZERS = ("adam", "sgd")
RESIDUAL_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Validated training settings (built from an ``ml_collections`` config).

  Every field has a range; a value outside it raises ``ValueError`` naming the
  field, before anything is written to the workdir.
  """

  model: str = "vgg11"
  width: float = 1.0
  norm: str = "batch"
  dataset: str = "mnist5k"
  data_dir: str = ""
  backend: str = "inline"
  batch_size: int = 64
  num_epochs: float = 10.0
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  warmup_steps: int = 50
  seed: int = 0
  log_every: int = 50
  checkpoint_every: int = 200
  eval_batch_size: int = 250
  augment_flip: bool = False
  augment_crop: int = 0
  decomposition: DecompositionConfig = DecompositionConfig()
  # DP of the releases (clip, noise, gradient protection, Poisson sampling);
  # ``batch_size`` is then the *expected* batch size.
  privacy: PrivacyConfig = PrivacyConfig()
  max_steps: int = 0  # 0: no cap beyond num_epochs
  # Options for the process backends (enclave, tee_only): sealed_path, key_path,
  # mode, threads, arena_mb, ... (see enclave_bridge).
  bridge: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # Scale (DESIGN section 10): data parallelism over this many of the host's
  # untrusted devices (batch split, weights replicated); the platform of the
  # untrusted program ("" = JAX's default); the dtype of the untrusted
  # residual path (the trusted half stays float32).
  num_devices: int = 1
  untrusted_device: str = ""
  residual_dtype: str = "float32"

  def __post_init__(self):
    def need(cond: bool, msg: str):
      if not cond:
        raise ValueError(f"config: {msg}")
    need(self.model in MODELS, f"model must be one of {sorted(MODELS)}, got {self.model!r}")
    need(0 < self.width <= 4, f"width must be in (0, 4], got {self.width}")
    need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
    need(1 <= self.batch_size <= 65536, f"batch_size must be in [1, 65536], got {self.batch_size}")
    need(0 < self.num_epochs <= 10000, f"num_epochs must be in (0, 10000], got {self.num_epochs}")
    need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
    need(0 < self.learning_rate <= 10, f"learning_rate must be in (0, 10], got {self.learning_rate}")
    need(0 <= self.weight_decay < 1, f"weight_decay must be in [0, 1), got {self.weight_decay}")
    need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
    need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
    need(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
    need(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
    need(self.augment_crop >= 0, f"augment_crop must be >= 0, got {self.augment_crop}")
    need(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
    need(not (self.privacy.enabled and self.backend == "dense"),
         "privacy.enabled with backend='dense': the dense backend runs everything on "
         "the untrusted device, so nothing would be protected; use inline, local or enclave")
    need(self.residual_dtype in RESIDUAL_DTYPES,
         f"residual_dtype must be one of {sorted(RESIDUAL_DTYPES)}, got {self.residual_dtype!r}")
    need(self.untrusted_device in ("",) + bk.UNTRUSTED_DEVICES,
         f"untrusted_device must be one of {bk.UNTRUSTED_DEVICES} (or '' for JAX's default), "
         f"got {self.untrusted_device!r}")
    need(isinstance(self.num_devices, int) and self.num_devices >= 1,
         f"num_devices must be an integer >= 1, got {self.num_devices!r}")
    if self.backend == "tee_only":
      need(self.num_devices == 1, "num_devices > 1 with backend='tee_only': it runs "
           "everything in the enclave, there is no accelerator work to split")
      need(self.residual_dtype == "float32", "residual_dtype='bfloat16' with "
           "backend='tee_only': it releases no residuals")
    for name in ("batch_size", "eval_batch_size"):
      need(getattr(self, name) % self.num_devices == 0,
           f"{name} {getattr(self, name)} must be a multiple of num_devices "
           f"{self.num_devices} (every device gets the same number of rows)")

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "TrainConfig":
    """Builds from an ``ml_collections.ConfigDict`` (or dict); unknown keys are errors."""
    cfg = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    dec = cfg.pop("decomposition", {}) or {}
    priv = cfg.pop("privacy", {}) or {}
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(cfg) - known)
    if extra:
      raise ValueError(f"config: unknown keys {extra}; known: {sorted(known)}")
    cfg = {k: v for k, v in cfg.items() if k in known}
    if "bridge" in cfg:
      cfg["bridge"] = dict(cfg["bridge"] or {})
    if isinstance(dec, DecompositionConfig):
      decomposition = dec
    else:
      decomposition = DecompositionConfig(**dict(dec))
    privacy = priv if isinstance(priv, PrivacyConfig) else PrivacyConfig(**dict(priv))
    return cls(decomposition=decomposition, privacy=privacy, **cfg)


@flax.struct.dataclass
class TrainState:
  """Public training state: step, weights, batch statistics, optimizer state."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  """Warm-up + cosine schedule with Adam(W) or SGD with momentum."""
  warmup = min(cfg.warmup_steps, max(0, total_steps - 1))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, warmup, max(total_steps, warmup + 1))
  if cfg.optimizer == "adam":
    return optax.adamw(schedule, weight_decay=cfg.weight_decay)
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                     optax.sgd(schedule, momentum=0.9, nesterov=True))


def create_state(model, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
  variables = model.init(key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"],
                    opt_state=tx.init(variables["params"]))


def make_update_fn(tx: optax.GradientTransformation) -> Callable:
  """Jitted optimizer step: ``(state, grads, new_stats) -> state``."""
  @jax.jit
  def update(state: TrainState, grads, new_stats) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1,
                         params=optax.apply_updates(state.params, updates),
                         batch_stats=new_stats, opt_state=opt_state)
  return update


def evaluate(backend: bk.Backend, state: TrainState, images: np.ndarray | None,
             labels: np.ndarray | None, batch_size: int,
             num_examples: int | None = None,
             group: dist.Group = dist.LOCAL) -> dict[str, float]:
  """Accuracy and mean loss over a split (padded batches, masked).

  With ``images=None`` the backend's trusted side owns the data and builds eval
  batch ``i`` itself; ``num_examples`` then says how many there are.  With
  several processes each evaluates its own shard and the totals are summed.
  """
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  if images is None:
    batches = [None] * (-(-int(num_examples) // batch_size))
  else:
    batches = data_lib.eval_batches(images, labels, batch_size)
  for i, batch in enumerate(batches):
    m = backend.evaluate(state.params, state.batch_stats, batch, i)
    for k in totals:
      totals[k] += float(m[k])
  if group.multi:
    _, summed = group.all_reduce(total={k: np.float32(v) for k, v in totals.items()},
                                 label="evaluation")
    totals = {k: float(v) for k, v in summed.items()}
  n = max(totals["count"], 1.0)
  return {"accuracy": totals["correct"] / n, "loss": totals["loss_sum"] / n,
          "count": int(round(totals["count"]))}


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if dataclasses.is_dataclass(x):
    return dataclasses.asdict(x)
  return str(x)


@dataclasses.dataclass
class DpRun:
  """The privacy side of one run: sampling, calibrated noise, epsilon (DESIGN section 7).

  Attributes:
    privacy: the config with ``noise_multiplier`` fixed (calibrated from
      ``target_epsilon`` up front when one is given).
    batch_rows: static rows of a batch (the padded size under Poisson sampling).
    expected_batch_size: Poisson's expected batch size, else ``None``.
    sampling_rate: ``q = batch_size / N``.
    releases_per_step: ``L`` (:meth:`asymml_jax.plan.Plan.releases_per_step`).
    target_epsilon: the configured target, if any.
    truncated_steps: Poisson draws larger than ``batch_rows`` (truncated).
    split: how the global batch splits over the processes (one process: all
      of it); ``sampling_rate`` is the global ``B / N``.
  """

  privacy: PrivacyConfig
  batch_rows: int
  expected_batch_size: float | None
  sampling_rate: float
  releases_per_step: int
  target_epsilon: float | None = None
  truncated_steps: int = 0
  split: dist.GlobalBatch | None = None

  @classmethod
  def make(cls, cfg: TrainConfig, model, num_train: int, total_steps: int, *,
           split: dist.GlobalBatch | None = None) -> "DpRun":
    """Sampling and calibrated noise of a run.

    Args:
      num_train: ``N``, the training examples of all processes together.
      split: the processes' data shards (DESIGN section 10); by default one
        process holds all ``N``.  This process's batch is its share of the
        global ``cfg.batch_size`` (Poisson: rate ``q = B / N`` on its shard).
    """
    split = split or dist.GlobalBatch(batch_size=cfg.batch_size, shard_sizes=(num_train,))
    if split.num_train != num_train:
      raise ValueError(f"the shards hold {split.num_train} examples, not {num_train}")
    pc = cfg.privacy
    pc.validate_for(norm=cfg.norm, scope=cfg.decomposition.scope, num_examples=num_train)
    poisson = pc.batch_sampling == "poisson"
    expected = split.local_expected_batch_size if poisson else None
    rows = (data_lib.poisson_max_batch(expected, split.local_num_train) if poisson
            else split.local_batch_size)
    q = split.sampling_rate
    plan = bk.make_plan_for(cfg.backend, model, rows, cfg.decomposition,
                            privacy=dataclasses.replace(pc, enabled=False),
                            expected_batch_size=expected)
    plan = dataclasses.replace(plan, privacy=pc)
    releases = plan.releases_per_step(train=True)
    if pc.enabled and pc.target_epsilon is not None:
      sigma = (accounting.calibrate_noise_multiplier(
          target_epsilon=pc.target_epsilon, delta=pc.delta, sampling_rate=q,
          steps=total_steps, releases_per_step=releases) if releases else 0.0)
      pc = pc.with_noise_multiplier(sigma)
    return cls(privacy=pc, batch_rows=rows, expected_batch_size=expected, sampling_rate=q,
               releases_per_step=releases, target_epsilon=cfg.privacy.target_epsilon,
               split=split)

  def epsilon(self, steps: int) -> float:
    """Epsilon after ``steps`` steps (PLD accountant); ``inf`` with DP off."""
    pc = self.privacy
    if not pc.enabled:
      return float("inf")
    if self.releases_per_step == 0 or steps == 0:
      return 0.0
    return accounting.epsilon(noise_multiplier=pc.noise_multiplier,
                              sampling_rate=self.sampling_rate, steps=int(steps),
                              releases_per_step=self.releases_per_step, delta=pc.delta)

  def poisson_batches(self, ds, seed: int, start: int):
    """``(step, batch)`` from ``start`` on: Poisson-sampled, padded, a pure function of the step."""
    step = start
    while True:
      batch, truncated = data_lib.poisson_batch(ds.train_images, ds.train_labels,
                                                self.expected_batch_size, seed=seed, step=step)
      self.truncated_steps += int(truncated)
      yield step, batch
      step += 1

  def describe(self, total_steps: int) -> str:
    pc = self.privacy
    return (f"privacy: sigma {pc.noise_multiplier:.4f}, clip {pc.clip:g}, grad_clip "
            f"{pc.grad_clip:g}, q {self.sampling_rate:.4g}, L {self.releases_per_step} "
            f"releases per example and step, delta {pc.delta:g}: epsilon "
            f"{self.epsilon(total_steps):.3f} after {total_steps} steps")

  def summary(self, steps: int) -> dict[str, Any]:
    pc = self.privacy
    out = {}
    if self.split is not None and self.split.num_processes > 1:
      out = {"num_processes": self.split.num_processes,
             "global_batch_size": self.split.batch_size, "num_train": self.split.num_train,
             "sampling_rate_basis": "global: expected global batch / examples of all "
                                    f"{self.split.num_processes} processes' shards"}
    return {**out, "enabled": pc.enabled, "epsilon": self.epsilon(steps), "delta": pc.delta,
            "noise_multiplier": pc.noise_multiplier, "clip": pc.clip,
            "grad_clip": pc.grad_clip, "target_epsilon": self.target_epsilon,
            "sampling": pc.batch_sampling, "sampling_rate": self.sampling_rate,
            "steps": int(steps), "releases_per_step": self.releases_per_step,
            "gradient_protection": pc.gradient_protection, "accountant": "pld",
            "poisson_truncated_steps": self.truncated_steps,
            "covers": "residual releases (forward and, with gradient protection, "
                      "backward); not the trusted weight-gradient aggregate"}


def _scale_options(cfg: TrainConfig, batch_rows: int, multi_process: bool = False
                   ) -> dict[str, Any]:
  """Backend options for ``num_devices``, ``untrusted_device``, ``residual_dtype`` (section 10).

  A mesh (:func:`asymml_jax.parallel.make_mesh`) when several devices or an
  explicit platform are asked for; nothing for the defaults, so a default run
  is unchanged.

  Raises:
    ValueError: the platform is absent, more devices are asked for than the
      host has, or the (padded) batch does not split evenly over them.
  """
  out: dict[str, Any] = {}
  if cfg.residual_dtype != "float32":
    out["residual_dtype"] = RESIDUAL_DTYPES[cfg.residual_dtype]
  if cfg.num_devices > 1 or cfg.untrusted_device:
    if multi_process and cfg.num_devices > 1:
      raise ValueError("config: num_devices > 1 together with several processes is not "
                       "supported yet; use one device per process")
    mesh = parallel.make_mesh(cfg.num_devices, platform=cfg.untrusted_device or None)
    parallel.check_batch_size(batch_rows, mesh, "batch")
    out["mesh"] = mesh
  return out


def _log(msg: str) -> None:
  print(msg, flush=True)


def train_and_evaluate(config: Mapping[str, Any] | TrainConfig, workdir: str, *,
                       backend_options: Mapping[str, Any] | None = None,
                       log: Callable[[str], None] = _log,
                       group: dist.Group = dist.LOCAL) -> dict[str, Any]:
  """Trains, checkpoints, evaluates and writes ``workdir/summary.json``.

  Args:
    config: a ``TrainConfig`` or an ``ml_collections`` config with its fields.
    workdir: output directory (checkpoints under ``workdir/checkpoints``),
      shared by all processes of a multi-host run.
    backend_options: extra keyword arguments for the backend factory.
    log: where progress lines go.
    group: the processes of a multi-host run (DESIGN section 10; see the
      module docstring); ``{process_id}`` and ``{num_processes}`` in the
      bridge paths are filled in per process.  A failure in this process is
      reported to the others, which stop with :class:`~asymml_jax.distributed.PeerFailed`.

  Returns:
    The summary dict (written by process 0 only).
  """
  with group.guard():
    return _train_and_evaluate(config, workdir, backend_options, log, group)


def _train_and_evaluate(config, workdir, backend_options, log, group) -> dict[str, Any]:
  cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_config(config)
  options = dict(backend_options or {})
  bridge = dist.format_process_paths(cfg.bridge, group)
  info = bk.backend_data_info(cfg.backend, bridge)
  if info is None:  # the data set is loaded here (dense, inline, local)
    ds = data_lib.load_dataset(cfg.dataset, cfg.data_dir or None)
    if group.multi:
      ds = data_lib.shard_dataset(ds, group.process_id, group.num_processes)
    info = {"name": ds.name, "image_shape": ds.image_shape, "num_classes": ds.num_classes,
            "num_train": len(ds.train_labels), "num_test": len(ds.test_labels)}
  else:  # the trusted side owns the data; only its public description is here
    ds = None
    options = {**bridge, "seed": group.process_seed(cfg.seed),
               "eval_batch_size": cfg.eval_batch_size,
               "augment_flip": cfg.augment_flip, "augment_crop": cfg.augment_crop,
               **options}
    shard = info.get("shard")
    if group.multi and shard is not None and tuple(shard) != (group.process_id,
                                                              group.num_processes):
      raise ValueError(f"process {group.process_id} of {group.num_processes} was given "
                       f"shard {shard[0]}/{shard[1]} ({bridge.get('sealed_path')}); it needs "
                       f"shard {group.process_id}/{group.num_processes}")
  model = get_model(cfg.model, num_classes=int(info["num_classes"]),
                    input_shape=tuple(info["image_shape"]), width=cfg.width, norm=cfg.norm)
  if group.multi:
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "bridge"}
    group.assert_same("the training config", json.dumps(settings, sort_keys=True,
                                                        default=_json_default).encode())
  shard_sizes = group.all_gather(np.int32(info["num_train"]), label="shard sizes")
  split = dist.GlobalBatch(batch_size=cfg.batch_size, process_id=group.process_id,
                           shard_sizes=tuple(int(n) for n in shard_sizes))
  n_train = split.num_train
  steps_per_epoch = split.steps_per_epoch
  total_steps = max(1, int(math.ceil(cfg.num_epochs * steps_per_epoch)))
  if cfg.max_steps:
    total_steps = min(total_steps, cfg.max_steps)

  dp = DpRun.make(cfg, model, n_train, total_steps, split=split)
  root = jax.random.key(cfg.seed)
  init_key, trusted_key = jax.random.split(root)
  if group.multi:  # every process's trusted side draws its own noise and subspaces
    trusted_key = jax.random.fold_in(trusted_key, group.process_id)
  data_seed = group.process_seed(cfg.seed)
  options.update(_scale_options(cfg, dp.batch_rows, group.multi))
  backend = bk.make_backend(cfg.backend, model, key=trusted_key, batch_size=dp.batch_rows,
                            decomposition=cfg.decomposition, privacy=dp.privacy,
                            expected_batch_size=dp.expected_batch_size, **options)
  tx = make_optimizer(cfg, total_steps)
  state = create_state(model, tx, init_key)
  update = make_update_fn(tx)

  os.makedirs(workdir, exist_ok=True)
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  mngr = checkpoints.Checkpoints(ckpt_dir, group)
  start = mngr.resume_step()
  if start is not None:
    state = mngr.restore(start, state)
    log(f"resumed from checkpoint at step {start}")
  else:
    start = 0
    state = group.broadcast(state, label="initial state")  # identical on every process

  log(backend.plan.table() if cfg.backend != "dense" else
      f"plan: dense backend (everything on the untrusted device)")
  log(f"training {cfg.model} on {info['name']} ({n_train} examples) with backend "
      f"{cfg.backend}: {total_steps} steps of batch {cfg.batch_size}"
      + (f" (Poisson, padded to {dp.batch_rows})" if dp.expected_batch_size else ""))
  if group.multi:
    log(f"{group.describe()}: {split.local_num_train} of {n_train} training examples; "
        f"global batch {cfg.batch_size}, here "
        + (f"Poisson at q {split.sampling_rate:.4g}" if dp.expected_batch_size
           else f"{dp.batch_rows} per step"))
  if dp.privacy.enabled:
    log(dp.describe(total_steps))

  aug_rng = np.random.default_rng([cfg.seed, 1])
  t_start = time.perf_counter()
  t_window, n_window, window = time.perf_counter(), 0, []
  completed, evaluating = start, False  # steps whose update is in `state`
  try:
    with backend:
      if ds is not None and dp.expected_batch_size:
        batches = dp.poisson_batches(ds, data_seed, start)
      elif ds is not None:
        batches = data_lib.train_batches(ds.train_images, ds.train_labels, dp.batch_rows,
                                         seed=data_seed, start_step=start)
      else:  # the enclave samples step `s`'s batch itself
        batches = ((s, None) for s in range(start, total_steps))
      for step, batch in batches:
        if step >= total_steps:
          break
        if batch is not None and (cfg.augment_flip or cfg.augment_crop):
          batch = data_lib.augment(batch, np.random.default_rng([data_seed, 2, step]),
                                   flip=cfg.augment_flip, crop_pad=cfg.augment_crop)
        loss, grads, new_stats, metrics = backend.grads(
            state.params, state.batch_stats, batch, step)
        if group.multi:  # one XLA all-reduce: the same update on every process
          (loss, grads, new_stats), metrics = group.all_reduce(
              (loss, grads, new_stats), metrics, label=f"step {step}")
        state = update(state, grads, new_stats)
        completed = step + 1
        window.append((float(loss), float(metrics["correct"]), float(metrics["count"])))
        n_window += int(window[-1][2])
        done = step + 1
        if not np.isfinite(window[-1][0]):
          raise FloatingPointError(f"loss became {window[-1][0]} at step {step}")
        if done % cfg.log_every == 0 or done == total_steps:
          dt = time.perf_counter() - t_window
          loss_m = float(np.mean([w[0] for w in window]))
          acc = sum(w[1] for w in window) / max(1.0, sum(w[2] for w in window))
          eps = f"  epsilon {dp.epsilon(done):.3f}" if dp.privacy.enabled else ""
          log(f"step {done}/{total_steps}  loss {loss_m:.4f}  train_acc {acc:.4f}{eps}  "
              f"{n_window / max(dt, 1e-9):.1f} examples/s")
          t_window, n_window, window = time.perf_counter(), 0, []
        if done % cfg.checkpoint_every == 0 or done == total_steps:
          mngr.save(done, state)
      train_seconds = time.perf_counter() - t_start
      mngr.wait_until_finished()  # the last checkpoint is on disk, or this raises
      evaluating = True  # (for a fault's message)
      ev = evaluate(backend, state, None if ds is None else ds.test_images,
                    None if ds is None else ds.test_labels, cfg.eval_batch_size,
                    num_examples=int(info["num_test"]), group=group)
      extra = getattr(backend, "summary_extras", None)
      extras = extra() if callable(extra) else {}
      multihost = (_multihost_summary(group, split, state, extras, dp, log) if group.multi
                   else None)
  except (KeyboardInterrupt, dist.PeerFailed) as e:
    # Every process holds the same state after `completed` steps: keep it.
    if group.is_primary and completed > start and mngr.latest_step() != completed:
      print(f"{'interrupted' if isinstance(e, KeyboardInterrupt) else 'stopping'}: saving a "
            f"checkpoint at step {completed}", flush=True)
      mngr.save(completed, state)
    mngr.wait_until_finished()
    raise
  except Exception as e:  # the first line a user sees says what to do
    mngr.wait_until_finished(quiet=True)
    faults.annotate(e, None if evaluating else completed, mngr.latest_step())
    raise
  finally:
    mngr.wait_until_finished(quiet=True)
    mngr.close()

  summary = {
      "backend": cfg.backend,
      "model": cfg.model,
      "dataset": info["name"],
      "test_accuracy": ev["accuracy"],
      "test_loss": ev["loss"],
      "test_examples": ev["count"],
      "steps": int(total_steps),
      "resumed_from": start,
      "batch_size": cfg.batch_size,
      "wall_seconds": time.perf_counter() - t_start,
      "train_seconds_this_run": train_seconds,
      "epsilon": dp.epsilon(total_steps),
      "privacy": dp.summary(total_steps),
      "plan": backend.plan.to_dict(),
      "config": dataclasses.asdict(cfg),
  }
  summary.update(extras)
  if "poisson_truncated_steps" in extras:
    summary["privacy"]["poisson_truncated_steps"] = extras.pop("poisson_truncated_steps")
    summary.pop("poisson_truncated_steps", None)
  if multihost is not None:
    summary["distributed"] = multihost
    summary["privacy"]["poisson_truncated_steps"] = sum(multihost["poisson_truncated_steps"])
  if group.is_primary:
    write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  log(f"test_accuracy {ev['accuracy']:.4f} on {ev['count']} held-out examples "
      f"({cfg.backend}, {summary['wall_seconds']:.1f} s), epsilon {summary['epsilon']:.4g}"
      + (f" at delta {dp.privacy.delta:g}" if dp.privacy.enabled else ""))
  return summary


def _multihost_summary(group: dist.Group, split: dist.GlobalBatch, state: TrainState,
                       extras: Mapping[str, Any], dp: DpRun,
                       log: Callable[[str], None]) -> dict:
  """What a multi-process run adds to the summary (collective: every process calls it)."""
  digest = dist.tree_digest(state.params)
  log(f"process {group.process_id}: final params sha256 {digest}")
  rows = group.all_gather(np.frombuffer(bytes.fromhex(digest), np.uint8), label="params digest")
  digests = [bytes(r.astype(np.uint8)).hex() for r in rows]
  pid = int((extras.get("enclave") or {}).get("pid") or -1)
  pids = [int(p) for p in group.all_gather(np.int32(pid), label="enclave pids")]
  truncated = int(extras.get("poisson_truncated_steps", dp.truncated_steps))
  truncated = [int(t) for t in group.all_gather(np.int32(truncated), label="truncations")]
  return {**split.summary(), "process_id": group.process_id,
          "poisson_truncated_steps": truncated,
          "params_sha256": digests, "params_identical": len(set(digests)) == 1,
          "enclave_pids": [p for p in pids if p > 0],
          "test_split": "each process evaluates its own shard; totals summed"}


def _inference_privacy(cfg: TrainConfig, workdir: str) -> PrivacyConfig:
  """The release settings a DP-trained model was trained with (same clip and sigma).

  Inference releases residuals of the inputs it is given, so it noises them
  as training did (the network was trained to expect that noise).  The
  calibrated ``sigma`` is read from the run's ``summary.json``.
  """
  pc = cfg.privacy
  if not pc.enabled or pc.target_epsilon is None:
    return pc
  path = os.path.join(workdir, "summary.json")
  try:
    with open(path) as f:
      sigma = float(json.load(f)["privacy"]["noise_multiplier"])
  except (OSError, KeyError, TypeError, ValueError) as e:
    raise FileNotFoundError(
        f"{path}: the calibrated noise multiplier of this DP run is needed for inference "
        f"and could not be read ({type(e).__name__}: {e}); finish training first") from None
  return pc.with_noise_multiplier(sigma)


def evaluate_checkpoint(config: Mapping[str, Any] | TrainConfig, workdir: str, *,
                        dataset=None, backend_options: Mapping[str, Any] | None = None,
                        log: Callable[[str], None] = _log) -> dict[str, Any]:
  """Evaluates the latest checkpoint in ``workdir`` on a held-out split (inference).

  Args:
    config: the training config (model, backend, batch sizes, bridge options).
    workdir: the training workdir (``workdir/checkpoints``).
    dataset: a :class:`asymml_jax.data.Dataset` for in-process backends; the
      process backends read their sealed data set themselves.
    backend_options: extra backend options.

  Returns:
    ``accuracy``, ``loss``, ``count``, ``step`` and per-batch latencies (seconds).
  """
  cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_config(config)
  options = dict(backend_options or {})
  info = bk.backend_data_info(cfg.backend, cfg.bridge)
  if info is None:
    ds = dataset if dataset is not None else data_lib.load_dataset(cfg.dataset, cfg.data_dir or None)
    info = {"name": ds.name, "image_shape": ds.image_shape, "num_classes": ds.num_classes,
            "num_test": len(ds.test_labels)}
  else:
    ds = None
    options = {**dict(cfg.bridge), "seed": cfg.seed, "eval_batch_size": cfg.eval_batch_size,
               **options}
  model = get_model(cfg.model, num_classes=int(info["num_classes"]),
                    input_shape=tuple(info["image_shape"]), width=cfg.width, norm=cfg.norm)
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"no checkpoints in {workdir} (expected {ckpt_dir})")
  tx = make_optimizer(cfg, 1)
  abstract = jax.eval_shape(lambda: create_state(model, tx, jax.random.key(0)))
  with ocp.CheckpointManager(ckpt_dir) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  privacy = _inference_privacy(cfg, workdir)
  root = jax.random.key(cfg.seed)
  _, trusted_key = jax.random.split(root)
  n_test = int(info["num_test"])
  latencies: list[float] = []
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  options.update(_scale_options(cfg, cfg.eval_batch_size))
  with bk.make_backend(cfg.backend, model, key=trusted_key, batch_size=cfg.eval_batch_size,
                       decomposition=cfg.decomposition, privacy=privacy,
                       **options) as backend:
    batches = ([None] * (-(-n_test // cfg.eval_batch_size)) if ds is None else
               list(data_lib.eval_batches(ds.test_images, ds.test_labels, cfg.eval_batch_size)))
    for i, batch in enumerate(batches):
      t0 = time.perf_counter()
      m = backend.evaluate(state.params, state.batch_stats, batch, i)
      latencies.append(time.perf_counter() - t0)
      for k in totals:
        totals[k] += float(m[k])
  n = max(totals["count"], 1.0)
  result = {"backend": cfg.backend, "step": int(step), "accuracy": totals["correct"] / n,
            "loss": totals["loss_sum"] / n, "count": int(totals["count"]),
            "batch_size": cfg.eval_batch_size, "latency_s": latencies,
            "median_latency_s": float(np.median(latencies)) if latencies else 0.0,
            "median_latency_warm_s": float(np.median(latencies[1:])) if len(latencies) > 1 else 0.0}
  warm = result["median_latency_warm_s"] or result["median_latency_s"]
  log(f"accuracy {result['accuracy']:.4f} on {result['count']} examples ({cfg.backend}); "
      f"per-batch latency median {warm * 1e3:.1f} ms after the first batch "
      f"(first batch, with compilation: {latencies[0] * 1e3:.0f} ms)")
  return result

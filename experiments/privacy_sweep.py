r"""Privacy sweep: held-out accuracy against epsilon, AsymML vs DP-SGD.

Usage:

  python -m experiments.privacy_sweep [--workdir=runs/privacy_sweep] \
      [--epsilons=1,2,4,8,inf] [--methods=asymml,dpsgd] [--num_epochs=E] \
      [--max_steps=S] [--width=W] [--json=FILE] [--plot=FILE] [--noresume]

Trains MNIST-5k (4,500 train / 500 held-out digits, delta = 1e-5 < 1/N) at
every ``(method, epsilon)``:

* ``asymml``: :func:`asymml_jax.train.train_and_evaluate` with the ``inline``
  backend and ``experiments/configs/mnist_dp.py`` (GroupNorm, per-sample
  subspaces, decomposed output gradients, Poisson batches); noise calibrated
  to the target epsilon on the residual releases (DESIGN section 7).  For
  ``inf`` privacy is disabled (same model, decomposition and gradient
  protection, no clipping or noise).
* ``dpsgd``: :func:`asymml_jax.baselines.dpsgd.train_dpsgd` on the same model
  family, data, batch size and optimiser; for ``inf`` no noise (clipping only).

Each run lives in ``WORKDIR/<method>_eps<e>/`` (its ``summary.json``); with
``--resume`` (default) a run whose ``summary.json`` exists is not retrained,
with ``--noresume`` its folder is removed and the run starts afresh.  After
every run the table (rows: method, epsilon_target, epsilon_achieved,
test_accuracy, noise_multiplier, steps, wall_seconds) is rewritten atomically
to ``--json`` (``inf`` written as ``Infinity``, as in ``summary.json``), so an
interrupted sweep loses at most the run in progress; at the end a plot of
accuracy against epsilon (log-x; ``inf`` at the right edge) goes to ``--plot``
and the table is printed.

Defaults: 3 epochs (210 steps of an expected 64 examples, Poisson batches
padded to 97) at width 0.25.  On a quiet 2-core CPU a DP-SGD step takes about
0.65 s and an AsymML step (inline, DP, gradient protection) about 1.3 s, so
the ten runs take about 40 minutes with compilation and evaluation.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import shutil
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging

from asymml_jax import train as train_lib
from asymml_jax.baselines import dpsgd

METHODS: tuple[str, ...] = ("asymml", "dpsgd")
DEFAULT_EPSILONS = "1,2,4,8,inf"
DELTA = 1e-5
DEFAULT_NUM_EPOCHS = 3.0
DEFAULT_WIDTH = 0.25
DP_CONFIG_MODULE = "experiments.configs.mnist_dp"
# Settings DP-SGD takes from the AsymML config, so both train the same model
# family on the same data with the same batch size and optimiser.
SHARED_KEYS: tuple[str, ...] = (
    "model", "dataset", "data_dir", "batch_size", "optimizer", "learning_rate",
    "warmup_steps", "weight_decay", "seed", "eval_batch_size")
ROW_KEYS: tuple[str, ...] = (
    "method", "epsilon_target", "epsilon_achieved", "test_accuracy", "noise_multiplier",
    "steps", "wall_seconds")

_EPSILONS = flags.DEFINE_string(
    "epsilons", DEFAULT_EPSILONS, "Comma-separated target epsilons; 'inf' trains without DP.")
_METHODS = flags.DEFINE_string(
    "methods", ",".join(METHODS), f"Comma-separated methods, from: {', '.join(METHODS)}.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/privacy_sweep",
                               "Output folder; one sub-folder per run.")
_NUM_EPOCHS = flags.DEFINE_float("num_epochs", DEFAULT_NUM_EPOCHS,
                                 "Epochs of every training run.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", 0, "Cap on the steps of every run (0: none).",
                                  lower_bound=0)
_WIDTH = flags.DEFINE_float("width", DEFAULT_WIDTH, "Channel multiplier of VGG11, in (0, 4].")
_DPSGD_CLIP = flags.DEFINE_float("dpsgd_clip", 1.0,
                                 "DP-SGD per-example gradient L2 clip.")
_JSON = flags.DEFINE_string("json", None, "Table path (default WORKDIR/privacy_sweep.json).")
_PLOT = flags.DEFINE_string("plot", None, "Plot path (default WORKDIR/privacy_sweep.png).")
_RESUME = flags.DEFINE_boolean("resume", True,
                               "Skip a (method, epsilon) whose summary.json exists.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepSettings:
  """What every run of the sweep shares (validated).

  Attributes:
    num_epochs: epochs of each run, ``> 0``.
    max_steps: step cap of each run (``0``: none).
    width: VGG11 channel multiplier, in ``(0, 4]``.
    delta: the ``delta`` of every ``(epsilon, delta)``, in ``(0, 1)``.
    dpsgd_clip: DP-SGD per-example gradient clip, ``> 0``.
  """

  num_epochs: float = DEFAULT_NUM_EPOCHS
  max_steps: int = 0
  width: float = DEFAULT_WIDTH
  delta: float = DELTA
  dpsgd_clip: float = 1.0

  def __post_init__(self):
    if not 0 < self.num_epochs <= 10000:
      raise ValueError(f"num_epochs must be in (0, 10000], got {self.num_epochs}")
    if self.max_steps < 0:
      raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
    if not 0 < self.width <= 4:
      raise ValueError(f"width must be in (0, 4], got {self.width}")
    if not 0 < self.delta < 1:
      raise ValueError(f"delta must be in (0, 1), got {self.delta}")
    if not (math.isfinite(self.dpsgd_clip) and self.dpsgd_clip > 0):
      raise ValueError(f"dpsgd_clip must be a finite number > 0, got {self.dpsgd_clip}")


def parse_epsilons(text: str) -> tuple[float, ...]:
  """``"1,2,inf"`` -> ``(1.0, 2.0, inf)``; each finite value must be ``> 0``.

  Raises:
    ValueError: empty list, a non-number, a value ``<= 0``, ``nan`` or a repeat.
  """
  out: list[float] = []
  for part in str(text).split(","):
    part = part.strip()
    if not part:
      continue
    try:
      value = float(part)
    except ValueError:
      raise ValueError(f"--epsilons: {part!r} is not a number (use e.g. 1,2,4,8,inf)") from None
    if math.isnan(value) or value <= 0:
      raise ValueError(f"--epsilons: each epsilon must be > 0 or inf, got {part!r}")
    if value in out:
      raise ValueError(f"--epsilons: {part!r} is listed twice")
    out.append(value)
  if not out:
    raise ValueError("--epsilons: give at least one epsilon (e.g. 1,2,4,8,inf)")
  return tuple(out)


def parse_methods(text: str) -> tuple[str, ...]:
  """``"asymml,dpsgd"`` -> ``("asymml", "dpsgd")``; unknown names list the choices."""
  out: list[str] = []
  for part in str(text).split(","):
    part = part.strip().lower()
    if not part:
      continue
    if part not in METHODS:
      raise ValueError(f"--methods: unknown method {part!r}; choices: {', '.join(METHODS)}")
    if part not in out:
      out.append(part)
  if not out:
    raise ValueError(f"--methods: give at least one of {', '.join(METHODS)}")
  return tuple(out)


def epsilon_label(epsilon: float) -> str:
  """``8.0`` -> ``"8"``, ``0.5`` -> ``"0.5"``, ``inf`` -> ``"inf"``."""
  return "inf" if math.isinf(epsilon) else format(epsilon, "g")


def run_name(method: str, epsilon: float) -> str:
  """Folder of one run: ``<method>_eps<e>``."""
  return f"{method}_eps{epsilon_label(epsilon)}"


def dp_base_config():
  """The AsymML DP config, ``experiments/configs/mnist_dp.py`` ``get_config()``.

  Raises:
    FileNotFoundError: the config module is missing.
  """
  try:
    module = importlib.import_module(DP_CONFIG_MODULE)
  except ModuleNotFoundError as e:
    if e.name != DP_CONFIG_MODULE:
      raise
    raise FileNotFoundError(
        "the AsymML path needs experiments/configs/mnist_dp.py (get_config() with a "
        "'privacy' sub-dict); run with --methods=dpsgd until it exists") from None
  return module.get_config()


def asymml_config(epsilon: float, settings: SweepSettings):
  """The ``train_and_evaluate`` config of the AsymML run at ``epsilon``.

  Finite ``epsilon``: DP on (noise calibrated to the target, ``delta``).
  ``inf``: DP off with the same GroupNorm, per-sample subspaces and decomposed
  output gradients.
  """
  config = dp_base_config()
  config.backend = "inline"
  config.norm = "group"
  config.width = float(settings.width)
  config.num_epochs = float(settings.num_epochs)
  config.max_steps = int(settings.max_steps)
  config.decomposition.scope = "per_sample"
  privacy = config.privacy
  privacy.gradient_protection = "decompose"
  privacy.delta = float(settings.delta)
  privacy.noise_multiplier = 0.0
  if math.isinf(epsilon):
    privacy.enabled = False
    privacy.target_epsilon = None
  else:
    privacy.enabled = True
    privacy.target_epsilon = float(epsilon)
    privacy.sampling = "poisson"
  return config


def dpsgd_config(epsilon: float, settings: SweepSettings) -> dpsgd.DpSgdConfig:
  """The DP-SGD run at ``epsilon`` (``inf``: no noise, clipping only).

  Model, data, batch size and optimiser come from the AsymML config when it
  exists (:data:`SHARED_KEYS`), else from :class:`DpSgdConfig`'s defaults.
  """
  shared: dict[str, Any] = {}
  try:
    base = dp_base_config()
  except FileNotFoundError:
    base = None
  if base is not None:
    shared = {k: base[k] for k in SHARED_KEYS if k in base}
  return dpsgd.DpSgdConfig(
      **shared, norm="group", width=float(settings.width),
      num_epochs=float(settings.num_epochs), max_steps=int(settings.max_steps),
      l2_clip=float(settings.dpsgd_clip), delta=float(settings.delta),
      noise_multiplier=0.0, target_epsilon=None if math.isinf(epsilon) else float(epsilon))


def run_one(method: str, epsilon: float, run_dir: str, settings: SweepSettings, *,
            log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains one ``(method, epsilon)`` into ``run_dir`` and returns its summary.

  Raises:
    RuntimeError: a finite target came back with ``epsilon = inf`` (DP was not
      applied), so the row would be mislabelled.
  """
  if method == "asymml":
    summary = train_lib.train_and_evaluate(asymml_config(epsilon, settings), run_dir, log=log)
  elif method == "dpsgd":
    summary = dpsgd.train_dpsgd(dpsgd_config(epsilon, settings), run_dir, log=log)
  else:
    raise ValueError(f"unknown method {method!r}; choices: {', '.join(METHODS)}")
  got = float(summary.get("epsilon", math.inf))
  if math.isfinite(epsilon) and not math.isfinite(got):
    raise RuntimeError(
        f"{method} at target epsilon {epsilon:g} reported epsilon = {got}: differential "
        "privacy was not applied by the training run")
  return summary


def _noise_multiplier(summary: dict[str, Any]) -> float:
  if "noise_multiplier" in summary:
    return float(summary["noise_multiplier"])
  privacy = summary.get("privacy")
  if isinstance(privacy, dict) and "noise_multiplier" in privacy:
    return float(privacy["noise_multiplier"])
  return 0.0


def make_row(method: str, epsilon: float, summary: dict[str, Any]) -> dict[str, Any]:
  """One table row from a run's summary."""
  return {
      "method": method,
      "epsilon_target": float(epsilon),
      "epsilon_achieved": float(summary.get("epsilon", math.inf)),
      "test_accuracy": float(summary["test_accuracy"]),
      "noise_multiplier": _noise_multiplier(summary),
      "steps": int(summary["steps"]),
      "wall_seconds": float(summary.get("wall_seconds", float("nan"))),
  }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """A fixed-width text table of the rows."""
  head = (f"{'method':<8} {'eps target':>10} {'eps achieved':>12} {'sigma':>8} "
          f"{'steps':>6} {'test acc':>9} {'wall s':>8}")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['method']:<8} {epsilon_label(r['epsilon_target']):>10} "
                 f"{r['epsilon_achieved']:>12.3f} {r['noise_multiplier']:>8.4f} "
                 f"{r['steps']:>6d} {r['test_accuracy']:>9.4f} {r['wall_seconds']:>8.1f}")
  return "\n".join(lines)


def plot_rows(rows: Sequence[dict[str, Any]], path: str, *, delta: float = DELTA) -> None:
  """Test accuracy against epsilon, one line per method, written to ``path`` (PNG).

  Log-x axis; ``inf`` is drawn at the right edge (twice the largest finite
  epsilon) and labelled "inf (no DP)".
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  finite = sorted({r["epsilon_target"] for r in rows if math.isfinite(r["epsilon_target"])})
  x_inf = 2.0 * finite[-1] if finite else 1.0
  x_of = lambda e: x_inf if math.isinf(e) else e
  fig, ax = plt.subplots(figsize=(6.0, 4.0))
  try:
    for method in dict.fromkeys(r["method"] for r in rows):
      pts = sorted((x_of(r["epsilon_target"]), r["test_accuracy"], r["epsilon_target"])
                   for r in rows if r["method"] == method)
      dp = [p for p in pts if math.isfinite(p[2])]
      (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method,
                        linestyle="-" if dp else "none")
      if dp and len(dp) < len(pts):  # dashed to the no-DP point: not a continuum
        line.set_data([p[0] for p in dp], [p[1] for p in dp])
        ax.plot([dp[-1][0], pts[-1][0]], [dp[-1][1], pts[-1][1]], linestyle="--",
                marker="o", color=line.get_color())
    ax.set_xscale("log")
    has_inf = any(math.isinf(r["epsilon_target"]) for r in rows)
    ax.set_xticks(finite + ([x_inf] if has_inf else []))
    ax.set_xticklabels([epsilon_label(e) for e in finite] + (["inf (no DP)"] if has_inf else []))
    ax.minorticks_off()
    if finite and has_inf:  # separates the DP points from the no-DP point
      ax.axvline(math.sqrt(finite[-1] * x_inf), color="0.8", linestyle=":", linewidth=1)
    ax.set_xlabel(f"epsilon (delta = {delta:g})")
    ax.set_ylabel("test accuracy (MNIST-5k, 500 held out)")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".tmp-{os.path.basename(path)}")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)
  finally:
    plt.close(fig)


def run_sweep(*, epsilons: Sequence[float], methods: Sequence[str], workdir: str,
              settings: SweepSettings, json_path: str | None = None,
              plot_path: str | None = None, resume: bool = True,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Trains every ``(method, epsilon)`` and writes the table and the plot.

  Args:
    epsilons: target epsilons (``inf``: no DP).
    methods: from :data:`METHODS`.
    workdir: output folder; run ``(m, e)`` in ``workdir/<m>_eps<e>``.
    settings: what every run shares.
    json_path: the table (default ``workdir/privacy_sweep.json``), rewritten
      atomically after every run.
    plot_path: the PNG (default ``workdir/privacy_sweep.png``).
    resume: reuse runs whose ``summary.json`` exists; otherwise remove the
      run's folder and train afresh.
    log: where progress lines go.

  Returns:
    The rows, in the order of ``methods`` then ``epsilons``.
  """
  json_path = json_path or os.path.join(workdir, "privacy_sweep.json")
  plot_path = plot_path or os.path.join(workdir, "privacy_sweep.png")
  rows: list[dict[str, Any]] = []
  t0 = time.perf_counter()

  def save():
    train_lib.write_json_atomic(json_path, {
        "dataset": "mnist5k", "delta": settings.delta, "settings": dataclasses.asdict(settings),
        "methods": list(methods), "epsilons": [float(e) for e in epsilons], "rows": rows})

  for method in methods:
    for epsilon in epsilons:
      run_dir = os.path.join(workdir, run_name(method, epsilon))
      summary_path = os.path.join(run_dir, "summary.json")
      if resume and os.path.exists(summary_path):
        with open(summary_path) as f:
          summary = json.load(f)
        log(f"== {run_name(method, epsilon)}: reusing {summary_path}")
      else:
        if not resume and os.path.isdir(run_dir):
          shutil.rmtree(run_dir)
        log(f"== {run_name(method, epsilon)}: training ({time.perf_counter() - t0:.0f} s "
            "into the sweep)")
        summary = run_one(method, epsilon, run_dir, settings, log=log)
      rows.append(make_row(method, epsilon, summary))
      save()
  plot_rows(rows, plot_path, delta=settings.delta)
  log(format_table(rows))
  log(f"table: {json_path}\nplot: {plot_path}\nsweep: {time.perf_counter() - t0:.0f} s")
  return rows


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
  try:
    epsilons = parse_epsilons(_EPSILONS.value)
    methods = parse_methods(_METHODS.value)
    settings = SweepSettings(num_epochs=_NUM_EPOCHS.value, max_steps=_MAX_STEPS.value,
                             width=_WIDTH.value, dpsgd_clip=_DPSGD_CLIP.value)
    if "asymml" in methods:
      dp_base_config()  # fail before any training if the AsymML config is missing
    run_sweep(epsilons=epsilons, methods=methods, workdir=_WORKDIR.value, settings=settings,
              json_path=_JSON.value, plot_path=_PLOT.value, resume=_RESUME.value,
              log=lambda line: print(line, flush=True))
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)

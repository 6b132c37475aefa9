"""The benchmark harness: backends side by side, ratios against TEE-only (DESIGN section 8).

One run measures every backend on the same model, batch shape and weights, in
one process group, and reports **ratios against ``tee_only`` measured in the
same run** (a lone absolute time on a shared CPU means little):

* ``tee_only``: the whole model in the enclave process (the TEE-only baseline);
* ``enclave``: AsymML, the trusted half in the enclave process, the untrusted
  half in this process's jitted program (on ``--untrusted_device``);
* ``dense``: everything untrusted (the GPU-only baseline, no privacy);
* ``slalom``: Slalom's blinded, Freivalds-verified inference
  (:mod:`asymml_jax.baselines.slalom`; inference only).  Its trusted part runs
  in this process (the harness times it from the runner's own counters), its
  offline precomputation for every repetition is done before timing and
  reported as ``precompute_s``.

Per backend and repetition it records the wall time of a training step
(``grads``) or of an inference batch (``evaluate``) and splits it, from the
bridge's counters, into

* trusted compute: time the enclave spent in its jitted trusted functions,
  of which ``overlap``: the low-rank convolutions it computed after replying,
  while this process convolved the residuals (DESIGN section 3, step 3);
* transfer: copying and validating payloads through the shared-memory arena
  (both ends);
* waiting: the rest of the bridge calls' time (socket round trips, scheduling);
* untrusted compute: the step's wall time outside bridge calls.

The same split is kept per trusted stage (``"forward/3"``, ``"backward/3"``)
for the per-layer breakdown.  It also reads the enclave process's peak
resident memory (``VmHWM``: the EPC budget matters on real SGX) and puts the
planner's trusted-MAC ratios (forward pass and training step,
:attr:`asymml_jax.plan.Plan.trusted_mac_ratio`, ``trusted_mac_ratio_train``)
next to the measured trusted-time ratio.

Roofline (``roofline=True``): before the backends run, a short subprocess with
the enclave's environment, pinned to the enclave's cores, measures the peak
matmul MAC rate and streaming bandwidth (:func:`asymml_jax.roofline.measure_peaks`,
``report["machine"]["peaks"]``); every backend with per-stage figures then gets
``"roofline"``: each trusted stage's modelled MACs and bytes
(:func:`asymml_jax.roofline.stage_costs`), its time at the peaks, the measured
trusted compute and their ratio (efficiency), and the same for the whole step.

Pinning (``pin=True``): the enclave process's threads go to one set of cores
and this (untrusted) process's threads to the others, so the two sides do not
share a core; on a 2-core machine, one core each.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from asymml_jax import backends as bk
from asymml_jax import plan as plan_lib
from asymml_jax import roofline
from asymml_jax import sample_images
from asymml_jax.baselines import slalom as _slalom  # noqa: F401  (registers ``slalom``)
from asymml_jax.decomposition import SCOPES, DecompositionConfig
from asymml_jax.models import get_model
from asymml_jax.models.base import StagedModel

import enclave_bridge  # registers the process backends
from enclave_bridge import launcher
from enclave_bridge.benchmark_report import BREAKDOWN_KEYS, RATIO_BASELINE

MODES = ("train", "infer")
PROCESS_BACKENDS = bk.PROCESS_BACKENDS
SLALOM = "slalom"
IMAGES = ("photos", "noise")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarkSettings:
  """One benchmark run (validated).

  Attributes:
    mode: ``train`` (one training step: forward + backward) or ``infer``.
    models: model names (:data:`asymml_jax.models.MODELS`).
    input_size: image height and width.
    channels: image channels.
    batch_size: examples per step.
    backends: backend names; ``tee_only`` must be among them (ratios).
    repeats: timed repetitions per backend (medians are reported).
    warmup: untimed repetitions first (compilation, caches).
    width: channel multiplier of the models.
    rank_fraction: ``r_max / C``.
    num_iters: subspace iterations.
    scope: ``per_sample`` or ``per_batch`` (allows the planner to choose
      ``per_batch`` per layer).
    pin: pin the enclave and this process to separate cores.
    enclave_threads: XLA threads in the enclave process.
    untrusted_device: ``cpu``, ``gpu`` or ``tpu`` for the untrusted program.
    seed: weights and synthetic images.
    roofline: measure the enclave core's peaks and report every trusted
      stage against its roofline time.
    rank_plan: ``fraction`` or ``calibrate`` (each site's static rank from
      the first batch, :mod:`asymml_jax.calibration`).
    tau: the residual-energy threshold of the rank choice.
    images: ``photos`` (scikit-image photographs: ranks follow real content)
      or ``noise`` (standard normal).
  """

  mode: str = "train"
  models: tuple[str, ...] = ("vgg16",)
  input_size: int = 32
  channels: int = 3
  batch_size: int = 32
  backends: tuple[str, ...] = ("tee_only", "enclave", "dense")

  @staticmethod
  def default_backends(mode: str) -> tuple[str, ...]:
    """``tee_only,enclave,dense``, plus ``slalom`` for inference."""
    return ("tee_only", "enclave", "dense") + ((SLALOM,) if mode == "infer" else ())
  repeats: int = 3
  warmup: int = 1
  width: float = 1.0
  rank_fraction: float = 1.0 / 16.0
  num_iters: int = 2
  scope: str = "per_sample"
  pin: bool = False
  enclave_threads: int = 1
  untrusted_device: str = "cpu"
  seed: int = 0
  roofline: bool = True
  rank_plan: str = "fraction"
  tau: float = 0.1
  images: str = "photos"

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    if not self.models:
      raise ValueError("give at least one model")
    from asymml_jax.models import MODELS  # pylint: disable=g-import-not-at-top
    for m in self.models:
      if m not in MODELS:
        raise ValueError(f"unknown model {m!r}; choices: {', '.join(sorted(MODELS))}")
    known = set(bk.available_backends())
    for b in self.backends:
      if b not in known:
        raise ValueError(f"unknown backend {b!r}; choices: {', '.join(sorted(known))}")
    if len(set(self.backends)) != len(self.backends):
      raise ValueError(f"a backend is listed twice: {self.backends}")
    if self.mode == "train" and SLALOM in self.backends:
      raise ValueError("slalom is inference-only: drop it from --backends or use --mode=infer")
    if RATIO_BASELINE not in self.backends:
      raise ValueError(f"backends must include {RATIO_BASELINE!r}: ratios are measured "
                       "against it in the same run")
    for name in ("input_size", "channels", "batch_size", "repeats", "enclave_threads"):
      v = getattr(self, name)
      if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not (isinstance(self.warmup, int) and self.warmup >= 0):
      raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
    if not 0 < self.width <= 4:
      raise ValueError(f"width must be in (0, 4], got {self.width}")
    if not isinstance(self.roofline, bool):
      raise ValueError(f"roofline must be a bool, got {self.roofline!r}")
    if self.scope not in SCOPES:
      raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
    if self.images not in IMAGES:
      raise ValueError(f"images must be one of {IMAGES}, got {self.images!r}")
    self.decomposition  # validates rank_plan and tau
    bk.untrusted_device(self.untrusted_device)  # a clear error if it is absent

  @property
  def decomposition(self) -> DecompositionConfig:
    return DecompositionConfig(rank_fraction=self.rank_fraction, num_iters=self.num_iters,
                               scope=self.scope, rank_plan=self.rank_plan, tau=self.tau)


# ------------------------------------------------------------------ pinning
def available_cores() -> list[int]:
  """The cores this process may run on, sorted."""
  return sorted(os.sched_getaffinity(0))


def split_cores(cores: Sequence[int]) -> tuple[set[int], set[int]]:
  """``(enclave cores, untrusted cores)``: the first half (at least one) to the enclave.

  >>> split_cores([0, 1])
  ({0}, {1})
  >>> split_cores([0, 1, 2, 3])
  ({0, 1}, {2, 3})
  """
  cores = sorted(cores)
  if len(cores) < 2:
    raise ValueError(f"pinning needs at least 2 cores, this process may use {cores}")
  half = max(1, len(cores) // 2)
  return set(cores[:half]), set(cores[half:])


def pin_process(pid: int, cores: set[int]) -> int:
  """Pins every thread of process ``pid`` to ``cores``; returns the threads pinned.

  ``sched_setaffinity`` acts on one thread; threads created later inherit the
  mask of their creator, so pinning all current threads pins the process.
  """
  tasks = os.listdir(f"/proc/{pid}/task")
  n = 0
  for tid in tasks:
    try:
      os.sched_setaffinity(int(tid), cores)
      n += 1
    except ProcessLookupError:  # a thread that just ended
      pass
  return n


def peak_rss_bytes(pid: int) -> int | None:
  """Peak resident memory (``VmHWM``) of process ``pid``, or ``None`` if unknown."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


# ------------------------------------------------------------------ timing
def _counters(backend) -> tuple[dict, dict]:
  client = getattr(backend, "client", None)
  if client is None:
    return {}, {}
  return dict(client.timing), {k: dict(v) for k, v in client.stage_timing.items()}


def split_time(wall: float, before: Mapping[str, float], after: Mapping[str, float]
               ) -> dict[str, float]:
  """Splits one repetition's wall time from the bridge counters before/after it.

  Returns ``trusted_compute_s`` (all of the enclave's compute),
  ``overlap_s`` (the part of it that ran while the untrusted side computed:
  the prefetched low-rank convolutions, DESIGN section 3 step 3),
  ``transfer_s``, ``waiting_s`` and ``untrusted_compute_s`` (the wall time
  outside bridge calls); all zero but the last for a backend without a
  bridge.  ``trusted - overlap + transfer + waiting + untrusted`` is the wall
  time.
  """
  d = {k: float(after.get(k, 0.0)) - float(before.get(k, 0.0))
       for k in ("call_s", "server_s", "compute_s", "client_copy_s", "calls", "overlap_s")}
  server_copy = max(0.0, d["server_s"] - d["compute_s"])
  return {"trusted_compute_s": d["compute_s"] + d["overlap_s"],
          "overlap_s": d["overlap_s"],
          "transfer_s": d["client_copy_s"] + server_copy,
          "waiting_s": max(0.0, d["call_s"] - d["server_s"] - d["client_copy_s"]),
          "untrusted_compute_s": max(0.0, wall - d["call_s"]),
          "bridge_calls": d["calls"]}


def stage_breakdown(before: Mapping[str, Mapping], after: Mapping[str, Mapping],
                    repeats: int) -> dict[str, dict[str, float]]:
  """Per ``"<op>/<stage>"``: trusted compute, transfer and waiting per repetition."""
  out = {}
  for key, a in sorted(after.items()):
    if not key.startswith(("forward/", "backward/", "whole_step/")):
      continue
    s = split_time(0.0, before.get(key, {}), a)
    s.pop("untrusted_compute_s")
    out[key] = {k: v / repeats for k, v in s.items()}
  return out


def _median_dict(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
  return {k: float(statistics.median(r[k] for r in rows)) for k in rows[0]}


# ------------------------------------------------------------------ data
def synthetic_batch(model: StagedModel, batch_size: int, seed: int,
                    images: str = "noise") -> dict[str, np.ndarray]:
  """Photographs or standard-normal images, and cycling labels.

  With ``rank_plan=fraction`` timing does not depend on content (every shape
  is static, the rank mask hides the chosen rank); calibrated ranks do.
  """
  rng = np.random.default_rng(seed)
  if images == "photos":
    h, _, c = model.input_shape
    image = sample_images.photo_batch(batch_size, h, c)
  else:
    image = rng.standard_normal((batch_size, *model.input_shape)).astype(np.float32)
  return {"image": image,
          "label": (np.arange(batch_size) % model.num_classes).astype(np.int32),
          "mask": np.ones((batch_size,), np.float32)}


# ------------------------------------------------------------------ one backend
def _run_backend(name: str, model: StagedModel, variables: Mapping, batch: Mapping,
                 settings: BenchmarkSettings, workdir: str,
                 cores: tuple[set[int], set[int]] | None,
                 log: Callable[[str], None]) -> dict[str, Any]:
  options: dict[str, Any] = {}
  if name in PROCESS_BACKENDS:
    options = enclave_bridge.seal_arrays(os.path.join(workdir, f"{model.name}-{name}"),
                                         batch["image"], batch["label"], model.num_classes,
                                         name="benchmark")
    options.update(threads=settings.enclave_threads, eval_batch_size=settings.batch_size)
  device = bk.untrusted_device(settings.untrusted_device)
  train = settings.mode == "train"
  params, stats = variables["params"], variables["batch_stats"]
  with jax.default_device(device):
    params, stats = jax.device_put((params, stats), device)
    t_start = time.perf_counter()
    with bk.make_backend(name, model, key=jax.random.key(settings.seed + 1),
                         batch_size=settings.batch_size, decomposition=settings.decomposition,
                         **options) as be:
      startup = time.perf_counter() - t_start
      pid = getattr(getattr(be, "process", None), "pid", None)
      if cores is not None and pid is not None:
        pin_process(pid, cores[0])
      own = None if name in PROCESS_BACKENDS else batch
      precompute = None
      if name == SLALOM:  # the offline phase, for every call below, untimed
        precompute = be.precompute(params, stats, settings.batch_size,
                                 count=settings.warmup + settings.repeats)

      def once(i: int):
        if train:
          return be.grads(params, stats, own, i)
        return be.evaluate(params, stats, own, 0)  # the one sealed eval batch

      for i in range(settings.warmup):
        jax.block_until_ready(once(i))
      rows, (_, before_stage) = [], _counters(be)
      ledger_before = be.ledger_summary() if hasattr(be, "ledger_summary") else None
      for i in range(settings.repeats):
        before, _ = _counters(be)
        t0 = time.perf_counter()
        jax.block_until_ready(once(settings.warmup + i))
        wall = time.perf_counter() - t0
        after, _ = _counters(be)
        row = {"wall_s": wall, **split_time(wall, before, after)}
        if name == SLALOM:  # trusted part in this process: the runner's own split
          row["trusted_compute_s"] = be.last_timing["trusted_s"]
          row["untrusted_compute_s"] = max(0.0, wall - row["trusted_compute_s"])
        rows.append(row)
        log(f"  {model.name} {name:<9} rep {i + 1}/{settings.repeats}: {wall:.3f} s "
            f"(trusted {row['trusted_compute_s']:.3f} s)")
      _, after_stage = _counters(be)
      traffic = be.ledger_summary() if hasattr(be, "ledger_summary") else None
      ranks = be.site_ranks()  # after the counters: a STATS call of its own
      crossed = {name: (crossed_bytes(traffic, c) - crossed_bytes(ledger_before, c))
                 / settings.repeats for name, c in (("all", None),
                                                    ("residuals", RESIDUAL_CLASSES))}
      peak = peak_rss_bytes(pid) if pid is not None else None
  med = _median_dict(rows)
  result = {"backend": name, "median": med, "repeats": rows, "startup_s": startup,
            "precompute_s": precompute,
            "trusted_peak_rss_bytes": peak,
            "stages": stage_breakdown(before_stage, after_stage, settings.repeats),
            "bytes_per_repeat": crossed, "ledger": traffic, "ranks": ranks}
  return result


RESIDUAL_CLASSES = frozenset({"activation_residual", "conv_output_residual",
                              "residual_gradient", "output_gradient_residual",
                              "output_gradient"})


def crossed_bytes(ledger: Mapping[str, Sequence[Mapping[str, Any]]] | None,
                  classes: frozenset[str] | None = None) -> int:
  """Bytes of payloads (both directions, of ``classes`` or all) in a ledger summary."""
  if not ledger:
    return 0
  return sum(int(row["bytes"]) for rows in ledger.values() for row in rows
             if classes is None or row["class"] in classes)


def bridge_figures(result: Mapping[str, Any]) -> dict[str, float] | None:
  """Payload throughput and per-call fixed overhead of a bridged backend.

  Throughput: the bytes that crossed per repetition (residuals, and the
  public weights that every stage call carries) over the transfer time (the
  copies into and out of the shared-memory arena and their validation, both
  ends); the residual share of those bytes is reported alongside.  Fixed
  overhead: the waiting time per bridge call (socket round trip, wake-ups and
  scheduling: everything but compute and copies).
  """
  med = result["median"]
  if not med.get("bridge_calls"):
    return None
  crossed = result["bytes_per_repeat"]
  return {"bytes_per_step": crossed["all"], "residual_bytes_per_step": crossed["residuals"],
          "transfer_s_per_step": med["transfer_s"],
          "throughput_gb_s": (crossed["all"] / med["transfer_s"] / 1e9
                              if med["transfer_s"] > 0 else math.inf),
          "fixed_overhead_us_per_call": 1e6 * med["waiting_s"] / med["bridge_calls"]}


# ------------------------------------------------------------------ roofline
PEAKS_TIMEOUT_S = 120.0


def measure_enclave_peaks(threads: int, cores: set[int] | None,
                          log: Callable[[str], None] = print) -> dict[str, Any] | None:
  """:class:`asymml_jax.roofline.Peaks` as the enclave would see them, or ``None``.

  Runs ``python -m asymml_jax.roofline`` in the environment the enclave server
  gets (:func:`enclave_bridge.launcher.server_env`: CPU only, its thread
  settings), pinned to ``cores`` when given (the enclave's), else with this
  process's affinity.
  """
  spec = launcher.EnclaveSpec(socket_path="peaks.sock", sealed_path="-", key_path="-",
                              workdir=tempfile.gettempdir(), threads=threads)
  argv = [spec.python, "-m", "asymml_jax.roofline"]
  if cores:
    argv.append("--cores=" + ",".join(str(c) for c in sorted(cores)))
  try:
    res = subprocess.run(argv, env=launcher.server_env(spec), capture_output=True, text=True,
                         timeout=PEAKS_TIMEOUT_S, check=True)
    peaks = roofline.Peaks.from_dict(json.loads(res.stdout.strip().splitlines()[-1]))
  except (subprocess.SubprocessError, OSError, ValueError, KeyError, IndexError) as e:
    tail = (getattr(e, "stderr", None) or "").strip().splitlines()[-1:]
    log(f"roofline: measuring the peaks failed ({e}{'; ' + tail[0] if tail else ''}); "
        "no roofline figures")
    return None
  log(f"roofline peaks (enclave environment, cores {sorted(cores) if cores else 'unpinned'}): "
      f"{peaks.matmul_macs_per_s / 1e9:.1f} GMAC/s matmul, "
      f"{peaks.stream_bytes_per_s / 1e9:.1f} GB/s stream")
  return {**peaks.to_dict(), "cores": sorted(cores) if cores else None, "threads": threads}


def roofline_figures(model: StagedModel, settings: BenchmarkSettings, result: Mapping[str, Any],
                     peaks: Mapping[str, Any] | None) -> dict[str, Any] | None:
  """Modelled cost and roofline time of every trusted stage of one backend row,
  against its measured trusted compute (:func:`asymml_jax.roofline.compare`)."""
  measured = result["stages"]
  if not measured or peaks is None:
    return None
  plan = bk.make_plan_for(result["backend"], model, settings.batch_size,
                          settings.decomposition)
  plan = plan_lib.with_ranks(model, plan, result.get("ranks") or {})
  costs = roofline.stage_costs(model, plan, settings.batch_size, settings.mode == "train",
                               whole_step="whole_step/0" in measured)
  return roofline.compare(costs, roofline.Peaks.from_dict(peaks),
                          {k: v["trusted_compute_s"] for k, v in measured.items()},
                          result["median"]["trusted_compute_s"])


# ------------------------------------------------------------------ the run
def run(settings: BenchmarkSettings, *, workdir: str | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs every backend on every model; returns the JSON-ready report."""
  cores = None
  if settings.pin:
    cores = split_cores(available_cores())
    pin_process(os.getpid(), cores[1])
    log(f"pinned: enclave on cores {sorted(cores[0])}, untrusted on {sorted(cores[1])}")
  peaks = (measure_enclave_peaks(settings.enclave_threads, cores[0] if cores else None, log)
           if settings.roofline else None)
  report: dict[str, Any] = {"settings": {**dataclasses.asdict(settings),
                                         "models": list(settings.models),
                                         "backends": list(settings.backends)},
                            "machine": {**machine_info(), "peaks": peaks}, "models": {}}
  own_tmp = workdir is None
  workdir = workdir or tempfile.mkdtemp(prefix="asymml-bench-")
  try:
    for mname in settings.models:
      model = get_model(mname, input_shape=(settings.input_size, settings.input_size,
                                            settings.channels), width=settings.width)
      variables = model.init(jax.random.key(settings.seed))
      batch = synthetic_batch(model, settings.batch_size, settings.seed, settings.images)
      plan = plan_lib.make_plan(model, settings.batch_size, settings.decomposition)
      rows = {}
      for name in settings.backends:
        log(f"{mname}: {name} ({settings.mode}, batch {settings.batch_size}, "
            f"{settings.input_size}x{settings.input_size})")
        rows[name] = _run_backend(name, model, variables, batch, settings, workdir, cores, log)
      base = rows[RATIO_BASELINE]["median"]
      for name, r in rows.items():
        med = r["median"]
        r["ratio_wall_vs_tee_only"] = base["wall_s"] / med["wall_s"]
        r["ratio_trusted_vs_tee_only"] = (base["trusted_compute_s"] / med["trusted_compute_s"]
                                          if med["trusted_compute_s"] > 0 else None)
        r["roofline"] = roofline_figures(model, settings, r, peaks)
      if "enclave" in rows:  # the ranks the enclave compiled with (calibrated or not)
        plan = plan_lib.with_ranks(model, plan, rows["enclave"]["ranks"])
      report["models"][mname] = {
          "plan": {"trusted_mac_ratio_forward": plan.trusted_mac_ratio,
                   "trusted_mac_ratio_train": plan.trusted_mac_ratio_train,
                   "trusted_macs": plan.trusted_macs, "dense_macs": plan.dense_macs,
                   "bytes_across": plan.bytes_across,
                   "modes": {s: p.mode for s, p in plan.sites.items()},
                   "ranks": bk.plan_ranks(plan)},
          "backends": rows,
          "bridge": bridge_figures(rows["enclave"]) if "enclave" in rows else None}
  finally:
    if own_tmp:
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.rmtree(workdir, ignore_errors=True)
  return report


def machine_info() -> dict[str, Any]:
  """What the numbers came from."""
  import platform  # pylint: disable=g-import-not-at-top
  return {"cpu_count": os.cpu_count(), "cores_allowed": available_cores(),
          "platform": platform.platform(), "processor": platform.processor(),
          "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
          "load_average": os.getloadavg()}

r"""Benchmark: TEE-only vs AsymML (enclave) vs dense (GPU-only), ratios in one run.

Usage:

  python -m experiments.benchmark --mode=infer --models=vgg16 --input_size=224 \
      --batch_size=4 --pin
  python -m experiments.benchmark --mode=train --models=vgg16,resnet20 \
      --input_size=32 --batch_size=32 --pin
  python -m experiments.benchmark --mode=infer --models=vgg16 --input_size=224 \
      --batch_size=4 --pin --rank_plan=calibrate

Every listed backend runs the same model, weights and batch shape in this one
run (warm-up excluded, ``--repeats`` timed repetitions, medians); the report
gives each backend's step time split into trusted compute, untrusted compute,
transfer and waiting, the speed-up over ``tee_only`` measured in the same run
(wall time and trusted-process compute time), the enclave's peak memory, the
planner's trusted-MAC ratios (forward, training step) next to the measured
trusted-time ratio, the bridge's residual throughput and fixed per-call
overhead and (``--roofline``, on by default) every trusted stage's modelled
MACs and bytes, its time at the peaks measured on the enclave's core, the
measured time and their ratio, in the table, the JSON and a second plot row.  The library is
:mod:`enclave_bridge.benchmark`; this script parses flags and writes
``--json`` and ``--plot`` (defaults under ``runs/benchmark/``).
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app
from absl import flags

from asymml_jax.train import write_json_atomic
from enclave_bridge import allocator
from enclave_bridge import benchmark
from enclave_bridge import benchmark_report

_MODE = flags.DEFINE_enum("mode", "train", list(benchmark.MODES), "train or infer.")
_MODELS = flags.DEFINE_list("models", ["vgg16"], "Models to benchmark.")
_SIZE = flags.DEFINE_integer("input_size", 32, "Image height and width.")
_CHANNELS = flags.DEFINE_integer("channels", 3, "Image channels.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Examples per step.")
_BACKENDS = flags.DEFINE_list("backends", None,
                              "Backends, tee_only included (ratios are against it); default "
                              "tee_only,enclave,dense, plus slalom for --mode=infer.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions per backend.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed repetitions first.")
_WIDTH = flags.DEFINE_float("width", 1.0, "Channel width multiplier.")
_RANK = flags.DEFINE_float("rank_fraction", 1.0 / 16.0, "r_max / C.")
_ITERS = flags.DEFINE_integer("num_iters", 2, "Subspace iterations.")
_SCOPE = flags.DEFINE_enum("scope", "per_sample", ["per_sample", "per_batch"],
                           "per_batch lets the planner choose per_batch per layer.")
_PIN = flags.DEFINE_bool("pin", False, "Pin the enclave and this process to separate cores.")
_THREADS = flags.DEFINE_integer("enclave_threads", 1, "XLA threads in the enclave.")
_DEVICE = flags.DEFINE_enum("untrusted_device", "cpu", ["cpu", "gpu", "tpu"],
                            "Device of the untrusted program.")
_SEED = flags.DEFINE_integer("seed", 0, "Weights and synthetic images.")
_ROOFLINE = flags.DEFINE_bool("roofline", True,
                              "Measure the enclave core's matmul and stream peaks and report "
                              "every trusted stage against its roofline time.")
_RANK_PLAN = flags.DEFINE_enum("rank_plan", "fraction", ["fraction", "calibrate"],
                               "Static ranks from --rank_fraction, or calibrated per site "
                               "on the first batch (residual energy <= --tau).")
_TAU = flags.DEFINE_float("tau", 0.1, "Residual-energy threshold of the rank choice.")
_IMAGES = flags.DEFINE_enum("images", "photos", ["photos", "noise"],
                            "scikit-image photographs or standard-normal noise.")
_JSON = flags.DEFINE_string("json", None, "JSON report (default runs/benchmark/<mode>.json).")
_PLOT = flags.DEFINE_string("plot", None, "PNG plot (default next to the JSON).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    settings = benchmark.BenchmarkSettings(
        mode=_MODE.value, models=tuple(_MODELS.value), input_size=_SIZE.value,
        channels=_CHANNELS.value, batch_size=_BATCH.value, backends=tuple(_BACKENDS.value or benchmark.BenchmarkSettings.default_backends(
            _MODE.value)),
        repeats=_REPEATS.value, warmup=_WARMUP.value, width=_WIDTH.value,
        rank_fraction=_RANK.value, num_iters=_ITERS.value, scope=_SCOPE.value,
        pin=_PIN.value, enclave_threads=_THREADS.value, untrusted_device=_DEVICE.value,
        seed=_SEED.value, roofline=_ROOFLINE.value, rank_plan=_RANK_PLAN.value,
        tau=_TAU.value, images=_IMAGES.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  json_path = _JSON.value or os.path.join("runs", "benchmark", f"{settings.mode}.json")
  plot_path = _PLOT.value or os.path.splitext(json_path)[0] + ".png"
  # The driver reuses freed memory too (as the enclave server does): the
  # untrusted side of every backend gets the same allocator.
  allocator.reuse_freed_memory()
  report = benchmark.run(settings, log=lambda s: print(s, flush=True))
  write_json_atomic(json_path, report)
  benchmark_report.plot(report, plot_path)
  print(benchmark_report.format_table(report))
  print(f"wrote {json_path} and {plot_path}")


if __name__ == "__main__":
  app.run(main)

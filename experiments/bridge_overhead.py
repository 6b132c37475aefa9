"""Bridge overhead: median training-step time of `local` vs `enclave`, same run.

  python -m experiments.bridge_overhead [--steps=20] [--json=F]

Both backends train the MNIST-5k model (vgg11, width 0.25, batch 64) from the
same weights; the ratio enclave/local is the cost of the process boundary
(two processes, socket round trips, shared-memory copies, validation).
"""

import os
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging

import enclave_bridge  # registers the enclave backend
from asymml_jax import backends as bk
from asymml_jax import data, train
from experiments import demo
from experiments.configs import mnist

_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per backend (after 2 warm-up steps).")
_JSON = flags.DEFINE_string("json", None, "Write the result here.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  cfg = train.TrainConfig.from_config(mnist.get_config())
  ds = data.load_dataset("mnist5k")
  sealed, key = demo.ensure_sealed(os.path.join(tempfile.gettempdir(), "asymml-overhead"))
  from asymml_jax.models import get_model
  model = get_model(cfg.model, input_shape=ds.image_shape, width=cfg.width, norm=cfg.norm)
  v = model.init(jax.random.key(0))
  times = {}
  for name in ("local", "enclave"):
    opts = {"sealed_path": sealed, "key_path": key} if name == "enclave" else {}
    with bk.make_backend(name, model, key=jax.random.key(1), batch_size=cfg.batch_size,
                         decomposition=cfg.decomposition, **opts) as be:
      batches = data.train_batches(ds.train_images, ds.train_labels, cfg.batch_size, seed=0)
      ts = []
      for i in range(_STEPS.value + 2):
        step, batch = next(batches)
        t0 = time.perf_counter()
        jax.block_until_ready(be.grads(v["params"], v["batch_stats"],
                                       None if name == "enclave" else batch, step))
        ts.append(time.perf_counter() - t0)
      times[name] = ts[2:]
  med = {k: statistics.median(t) for k, t in times.items()}
  result = {"local_step_s": med["local"], "enclave_step_s": med["enclave"],
            "ratio_enclave_over_local": med["enclave"] / med["local"],
            "steps": _STEPS.value, "batch_size": cfg.batch_size,
            "p90": {k: float(np.percentile(t, 90)) for k, t in times.items()}}
  print(f"median step: local {med['local'] * 1e3:.1f} ms, enclave {med['enclave'] * 1e3:.1f} ms, "
        f"ratio {result['ratio_enclave_over_local']:.2f}x")
  if _JSON.value:
    train.write_json_atomic(_JSON.value, result)


if __name__ == "__main__":
  app.run(main)

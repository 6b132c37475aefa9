"""Evaluates a trained checkpoint on a sealed data set through any backend.

  python -m experiments.infer --config=experiments/configs/mnist.py --workdir=runs/demo/train \
      --sealed=runs/demo/mnist5k.sealed --key=runs/demo/key.bin --config.backend=enclave

Prints the accuracy and the per-batch latency (the inference path users deploy).
With an in-process backend (dense, inline, local) the data set is unsealed in
this process, which is only meaningful for simulation.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

import enclave_bridge  # registers the enclave and tee_only backends
from asymml_jax import train
from enclave_bridge import seal

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with checkpoints/.")
_SEALED = flags.DEFINE_string("sealed", None, "Sealed data set (enclave_bridge.seal).")
_KEY = flags.DEFINE_string("key", None, "Key file of the sealed data set.")
_JSON = flags.DEFINE_string("json", None, "Write the result here.")
flags.mark_flags_as_required(["config", "workdir", "sealed", "key"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  try:
    bridge = dict(config.get("bridge", {}) or {})
    bridge.update(sealed_path=_SEALED.value, key_path=_KEY.value)
    config.bridge = bridge
    dataset = None
    if config.backend not in ("enclave", "tee_only"):
      dataset = seal.unseal_dataset(_SEALED.value, _KEY.value)
    result = train.evaluate_checkpoint(config, _WORKDIR.value, dataset=dataset)
  except (ValueError, FileNotFoundError, seal.SealError) as e:
    raise app.UsageError(str(e)) from None
  if _JSON.value:
    train.write_json_atomic(_JSON.value, result)
  print(json.dumps({k: v for k, v in result.items() if k != "latency_s"}))


if __name__ == "__main__":
  app.run(main)

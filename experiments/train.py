"""Trains a model through any backend and writes WORKDIR/summary.json.

  python -m experiments.train --config=experiments/configs/mnist.py --workdir=/tmp/run \
      --config.backend=inline

Rerunning with the same workdir resumes from the latest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from asymml_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, summary.json).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)

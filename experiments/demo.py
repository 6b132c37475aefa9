"""`make demo`: train the MNIST-5k model through the split backend and report.

  python -m experiments.demo [--backend=local] [--workdir=runs/demo]
"""

from absl import app, flags, logging

from experiments.configs import mnist
from asymml_jax import train

_BACKEND = flags.DEFINE_string("backend", "local", "Backend to train with.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Output directory.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  config = mnist.get_config()
  config.backend = _BACKEND.value
  summary = train.train_and_evaluate(config, _WORKDIR.value)
  print(f"\ntest_accuracy {summary['test_accuracy']:.4f}   epsilon {summary['epsilon']}   "
        f"backend {summary['backend']}   wall {summary['wall_seconds']:.0f} s")


if __name__ == "__main__":
  app.run(main)

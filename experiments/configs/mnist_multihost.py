"""MNIST-5k on several hosts, one enclave each over its own sealed shard (DESIGN section 10).

The mnist config with backend=enclave and per-process bridge paths:
``{process_id}`` and ``{num_processes}`` are filled in by each process, so
every host runs the same command line with its own ``--process_id``.
``batch_size`` is the *global* batch (each of P processes takes
``batch_size / P`` per step), so the run has the steps, sampling rate and
epsilon of the single-process mnist config.

Seal host i's shard (on host i, or here for all):

  python -m enclave_bridge.seal --dataset=mnist5k --shard=I/N --new_key \
      --out=runs/multihost/data/mnist5k-I-of-N.sealed --key=runs/multihost/data/key-I.bin

then on every host (same workdir, reachable by process 0):

  python -m experiments.train --config=experiments/configs/mnist_multihost.py \
      --workdir=runs/multihost/train --coordinator_address=HOST0:PORT \
      --num_processes=N --process_id=I

or all on this machine: ``python -m experiments.multihost --num_processes=N``.
"""

from experiments.configs import mnist


def get_config():
  c = mnist.get_config()
  c.backend = "enclave"
  c.bridge.sealed_path = "runs/multihost/data/mnist5k-{process_id}-of-{num_processes}.sealed"
  c.bridge.key_path = "runs/multihost/data/key-{process_id}.bin"
  c.bridge.workdir = "runs/multihost/enclave-{process_id}"
  return c

"""MNIST-5k with differential privacy on every release (DESIGN section 7).

Run: python -m experiments.train --config=experiments/configs/mnist_dp.py --workdir=W

What changes against ``mnist.py``:

* ``norm='group'`` and ``scope='per_sample'``: one example's releases depend on
  that example alone (BatchNorm and per-batch subspaces are refused in DP mode);
* Poisson sampling of batches (``batch_size`` is the expected size; batches are
  padded to a fixed size with a mask) and a loss divided by the expected size;
* every released activation residual is clipped per example to ``clip`` and
  noised with ``N(0, (sigma clip)^2 I)``; every output gradient is decomposed
  and only its residual leaves, clipped to ``grad_clip`` and noised likewise;
* ``sigma`` is calibrated up front so that the whole run is
  ``(target_epsilon, delta)``-DP for the releases (PLD accountant).

The bounds are small on purpose: with thousands of elements per release, the
noise has about ``sigma sqrt(d)`` times the norm of a clipped residual, so the
residual carries little signal under DP whatever the bound, and a small bound
keeps the noise added to the network's activations and gradients small.  The
accuracy then comes from the principal channels, which never leave the
enclave (``rank_fraction`` 1/16 and ``tau`` 0.1 as in ``mnist.py``; a larger
rank keeps more of the signal there at a higher trusted cost).
"""

import ml_collections

from experiments.configs import mnist


def get_config() -> ml_collections.ConfigDict:
  c = mnist.get_config()
  c.norm = "group"
  c.decomposition.scope = "per_sample"
  c.privacy = ml_collections.ConfigDict(dict(
      enabled=True, clip=0.01, grad_clip=1e-5, noise_multiplier=0.0,
      target_epsilon=8.0, delta=1e-5, gradient_protection="decompose",
      sampling="poisson"))
  return c

"""Baselines that AsymML is compared against (DESIGN sections 7 and 8).

* :mod:`~asymml_jax.baselines.dpsgd`: DP-SGD (Abadi et al. 2016) on the same
  staged models, data and ``dp_accounting``-based accounting.
* :mod:`~asymml_jax.baselines.slalom`: Slalom (Tramer and Boneh, ICLR 2019),
  blinded and Freivalds-verified inference; importing it registers the
  inference-only ``slalom`` backend.
"""

"""Baselines that AsymML is compared against (DESIGN section 7, "Privacy").

* :mod:`~asymml_jax.baselines.dpsgd`: DP-SGD (Abadi et al. 2016) on the same
  staged models, data and ``dp_accounting``-based accounting.
"""

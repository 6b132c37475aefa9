"""Empirical evaluation of what the untrusted side learns (DESIGN section 7).

* :mod:`~asymml_jax.evaluation.leakage`: "measured leakage": the KSG
  mutual-information estimator between inputs and untrusted-visible tensors
  (after a PCA projection), the analytic Gaussian-channel upper bound for the
  clipped, noised residual release, and synthetic Gaussians with known mutual
  information for sanity checks.  Pure numpy/scipy/scikit-learn (no JAX).
"""

from __future__ import annotations

from asymml_jax.evaluation import leakage

__all__ = ["leakage"]

"""Empirical evaluation of what the untrusted side learns (DESIGN section 7).

* :mod:`~asymml_jax.evaluation.leakage`: "measured leakage": the KSG
  mutual-information estimator between inputs and untrusted-visible tensors
  (after a PCA projection), the analytic Gaussian-channel upper bound for the
  clipped, noised residual release, and synthetic Gaussians with known mutual
  information for sanity checks.  Pure numpy/scipy/scikit-learn (no JAX).
* :mod:`~asymml_jax.evaluation.step_view`: every per-example tensor the
  untrusted side sees in one training step (released activation residuals,
  output-gradient residuals, the weight-gradient aggregate), extracted from the
  program the backends run.  Imports JAX; not imported here, so that
  ``leakage`` stays importable without it
  (``from asymml_jax.evaluation import step_view``).
* :mod:`~asymml_jax.evaluation.gradient_attack`: gradient inversion (DLG /
  Inverting Gradients) of what the untrusted side receives in one step (JAX).
"""

from __future__ import annotations

from asymml_jax.evaluation import leakage

__all__ = ["leakage"]

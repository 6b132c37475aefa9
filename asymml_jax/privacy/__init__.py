"""Differential privacy of the residual releases (DESIGN section 7).

* :mod:`~asymml_jax.privacy.config`: :class:`PrivacyConfig`, the validated
  settings (no JAX needed).
* :mod:`~asymml_jax.privacy.noise`: the mechanism, per-sample clipping plus
  Gaussian noise, pure and jittable.
* :mod:`~asymml_jax.privacy.accounting`: host-side ``(epsilon, delta)``
  accounting and noise calibration with ``dp_accounting``.
"""

from __future__ import annotations

from asymml_jax.privacy import accounting
from asymml_jax.privacy import config
from asymml_jax.privacy import noise
from asymml_jax.privacy.config import PrivacyConfig

__all__ = ["PrivacyConfig", "accounting", "config", "noise"]

"""Differential-privacy settings of the residual release (DESIGN sections 2, 7, 11).

:class:`PrivacyConfig` is a frozen, keyword-only dataclass that validates
itself (DESIGN section 11, "Habits"): ranges that need no context are checked
at construction (``__post_init__``); the rules that depend on the rest of the
training configuration (normalisation, subspace scope, data-set size) are
checked by :meth:`PrivacyConfig.validate_for`, which the training pipeline
calls before anything runs.

The mechanism these settings drive (DESIGN section 7): every residual that
leaves the enclave, ``R = clip(X - U U^T X) + N(0, (sigma c)^2 I)``, is clipped
per sample to L2 norm ``c`` and perturbed with Gaussian noise of standard
deviation ``sigma * c``; :mod:`asymml_jax.privacy.accounting` turns
``(sigma, q, steps, L)`` into ``(epsilon, delta)``.

This module imports neither JAX nor ``dp_accounting``: a configuration can be
checked on any host.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

GRADIENT_PROTECTIONS: tuple[str, ...] = ("decompose", "none")
SAMPLINGS: tuple[str, ...] = ("auto", "poisson", "shuffle")
# Normalisations that act on one sample at a time (see asymml_jax.layers.NORMS).
# A whitelist on purpose: a new normalisation must be reviewed for sample mixing
# before DP mode accepts it.
PER_SAMPLE_NORMS: tuple[str, ...] = ("group", "none")
PER_SAMPLE_SCOPES: tuple[str, ...] = ("per_sample",)


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
  """(epsilon, delta)-DP settings for the residuals sent out of the TEE.

  Implements the configuration side of DESIGN section 7 ("Privacy").

  Attributes:
    enabled: turn clipping, noise and accounting on.  Off, the decomposed
      network computes exactly the dense network's function (DESIGN section 1)
      and no privacy is claimed.
    clip: per-sample, per-release L2 bound ``c`` on each activation residual
      (the sensitivity of one release); must be ``> 0`` when enabled.
    grad_clip: the same bound for each output-gradient residual ``dY_R``
      (``gradient_protection='decompose'``).  Gradients live on another scale
      than activations (``~1/B`` of the loss), so they get their own bound;
      the noise std is ``sigma * grad_clip``, so each gradient release is a
      Gaussian mechanism with the same noise multiplier ``sigma`` and the
      accounting is unchanged.  ``> 0`` when enabled.
    noise_multiplier: ``sigma``; the noise standard deviation is
      ``sigma * clip``.  ``>= 0``.  Leave at ``0`` when ``target_epsilon`` is
      given.
    target_epsilon: if set, ``sigma`` is calibrated from it up front
      (:func:`asymml_jax.privacy.accounting.calibrate_noise_multiplier`).
      ``> 0``.
    delta: the ``delta`` of ``(epsilon, delta)``; ``0 < delta < 1`` here and
      ``delta < 1 / N`` for a data set of ``N`` examples (``validate_for``).
    gradient_protection: ``"decompose"`` (output gradients ``dY`` are decomposed
      like activations and only their clipped, noised residual leaves) or
      ``"none"`` (the reference behaviour: ``dY`` leaves in the clear; refused
      in DP mode).
    sampling: how the enclave draws batches: ``"poisson"`` (each example
      independently with probability ``q``; the sampling the accountant
      assumes; batches padded to a fixed size with a mask), ``"shuffle"``
      (fixed-size batches of a permutation; refused in DP mode) or ``"auto"``
      (Poisson when enabled, shuffle otherwise; see :attr:`batch_sampling`).
  """

  enabled: bool = False
  clip: float = 1.0
  grad_clip: float = 1e-3
  noise_multiplier: float = 0.0
  target_epsilon: float | None = None
  delta: float = 1e-5
  gradient_protection: str = "decompose"
  sampling: str = "auto"

  @property
  def batch_sampling(self) -> str:
    """``poisson`` or ``shuffle``: how batches are actually drawn."""
    if self.sampling == "auto":
      return "poisson" if self.enabled else "shuffle"
    return self.sampling

  def with_noise_multiplier(self, noise_multiplier: float) -> "PrivacyConfig":
    """This config with ``sigma`` fixed (e.g. calibrated from ``target_epsilon``)."""
    return dataclasses.replace(self, noise_multiplier=float(noise_multiplier),
                               target_epsilon=None)

  def __post_init__(self):
    def need(cond: bool, msg: str):
      if not cond:
        raise ValueError(f"privacy config: {msg}")

    need(isinstance(self.enabled, bool),
         f"enabled must be a bool, got {self.enabled!r}")
    need(_is_real(self.clip) and math.isfinite(self.clip),
         f"clip must be a finite number, got {self.clip!r}")
    need(not self.enabled or self.clip > 0,
         f"clip must be > 0 when enabled, got {self.clip}: it is the L2 "
         "sensitivity of one release, and the noise std is noise_multiplier * "
         "clip")
    need(_is_real(self.grad_clip) and math.isfinite(self.grad_clip),
         f"grad_clip must be a finite number, got {self.grad_clip!r}")
    need(not self.enabled or self.grad_clip > 0,
         f"grad_clip must be > 0 when enabled, got {self.grad_clip}: it is the L2 "
         "sensitivity of one output-gradient release")
    need(_is_real(self.noise_multiplier) and math.isfinite(self.noise_multiplier)
         and self.noise_multiplier >= 0,
         f"noise_multiplier must be a finite number >= 0, got "
         f"{self.noise_multiplier!r}")
    if self.target_epsilon is not None:
      need(_is_real(self.target_epsilon) and math.isfinite(self.target_epsilon)
           and self.target_epsilon > 0,
           f"target_epsilon must be a finite number > 0 (or None), got "
           f"{self.target_epsilon!r}")
      need(self.noise_multiplier == 0,
           f"set either noise_multiplier ({self.noise_multiplier}) or "
           f"target_epsilon ({self.target_epsilon}), not both: with a target "
           "the noise multiplier is calibrated from it")
    need(_is_real(self.delta) and 0 < self.delta < 1,
         f"delta must be in (0, 1), got {self.delta!r}")
    need(self.gradient_protection in GRADIENT_PROTECTIONS,
         f"gradient_protection must be one of {GRADIENT_PROTECTIONS}, got "
         f"{self.gradient_protection!r}")
    need(self.sampling in SAMPLINGS,
         f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")

  def validate_for(self, *, norm: str, scope: str, num_examples: int) -> None:
    """Checks that DP mode is sound for the rest of the training setup.

    The rules of DESIGN section 7: one sample's residual must depend on that
    sample alone (per-sample subspaces, per-sample normalisation), so that
    clipping bounds the sensitivity of each release to ``clip``; batches must
    be Poisson-sampled, as the accountant assumes; and ``delta < 1 / N``.
    Does nothing when ``enabled`` is false.

    Args:
      norm: the model's normalisation (``asymml_jax.layers.NORMS``).
      scope: the decomposition scope (``per_sample`` or ``per_batch``).
      num_examples: ``N``, the number of private training examples.

    Raises:
      ValueError: with the reason, when DP mode would not hold.
    """
    if not self.enabled:
      return

    def need(cond: bool, msg: str):
      if not cond:
        raise ValueError(f"privacy config (enabled=True): {msg}")

    need(norm != "batch",
         "norm='batch' is not allowed with DP: BatchNorm mixes samples: one "
         "sample's normalised activation, hence its residual, would depend on "
         "the others (batch mean and variance), so clipping would no longer "
         "bound one sample's influence; use norm='group'")
    need(norm in PER_SAMPLE_NORMS,
         f"unknown norm {norm!r}: DP mode accepts only normalisations known to "
         f"act on one sample at a time, {PER_SAMPLE_NORMS}")
    need(scope != "per_batch",
         "scope='per_batch' is not allowed with DP: one U shared by the whole "
         "batch mixes samples: one sample's residual R = X - U U^T X would "
         "depend on the other samples through U, so clipping would no longer "
         "bound one sample's influence; use scope='per_sample'")
    need(scope in PER_SAMPLE_SCOPES,
         f"unknown scope {scope!r}: DP mode needs one of {PER_SAMPLE_SCOPES}")
    need(isinstance(num_examples, int) and not isinstance(num_examples, bool)
         and num_examples >= 1,
         f"num_examples must be an int >= 1, got {num_examples!r}")
    need(self.delta < 1.0 / num_examples,
         f"delta must be < 1/N = {1.0 / num_examples:.3g} (N = {num_examples} "
         f"examples), got delta = {self.delta:g}: a mechanism that publishes "
         "a random example in the clear is (0, 1/N)-DP, so delta >= 1/N "
         "promises nothing")
    need(self.batch_sampling == "poisson",
         f"sampling={self.sampling!r} is not allowed with DP: the accountant "
         "composes Poisson-subsampled Gaussian events (each example in a batch "
         "independently with probability q), and its amplification bound does "
         "not hold for fixed-size shuffled batches; use sampling='poisson'")
    need(self.gradient_protection == "decompose",
         "gradient_protection='none' is not allowed with DP: every output "
         "gradient dY would leave the enclave in the clear (its zero pattern "
         "is the ReLU mask of private pre-activations) and the epsilon would "
         "not bound it; use gradient_protection='decompose'")
    need(self.noise_multiplier > 0 or self.target_epsilon is not None,
         "noise_multiplier is 0 and no target_epsilon is set: clipping alone "
         "gives epsilon = inf; set noise_multiplier > 0 or target_epsilon")

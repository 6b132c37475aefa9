"""Calibrated static ranks: each site's ``r`` from the energy of real activations.

``DecompositionConfig(rank_plan="calibrate")`` (DESIGN section 3,
"Subspace"): instead of ``r_max = ceil(C / 16)`` fixed before any data is
seen, the trusted executor measures, on the first batch it serves, the
energy spectrum of every split site's activations (the eigenvalues of each
sample's ``C x C`` Gram, in float64) and compiles that site with the
smallest static rank whose residual keeps at most ``tau`` of every sample's
energy.  Any ``U`` keeps the split exact (``X_L + R = X``), so calibration
changes speed and what stays inside, never the model's outputs.

The chosen ranks depend on private data and are visible outside the enclave
(through its timing, and in the plan it reports), so they are declared in the
boundary ledger, and a plan with differential privacy refuses calibration
(:func:`asymml_jax.plan.make_plan`): no epsilon covers them.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from asymml_jax.decomposition import DecompositionConfig


def energy_spectra(x: np.ndarray, scope: str) -> np.ndarray:
  """Descending eigenvalues of the pixel Gram ``X^T X`` of each sample, or of the batch.

  Args:
    x: ``(B, H, W, C)`` activations.
    scope: ``per_sample`` (one spectrum per sample) or ``per_batch`` (one).

  Returns:
    ``(B, C)`` or ``(1, C)`` float64 energies, each row descending.
  """
  x = np.asarray(x, np.float64)
  b, h, w, c = x.shape
  rows = x.reshape(b, h * w, c) if scope == "per_sample" else x.reshape(1, b * h * w, c)
  grams = np.einsum("bnc,bnd->bcd", rows, rows)
  return np.maximum(np.linalg.eigvalsh(grams)[:, ::-1], 0.0)


def needed_rank(spectra: np.ndarray, tau: float) -> int:
  """Smallest ``r`` with residual energy ``<= tau`` of the total for every row.

  The same rule as :func:`asymml_jax.decomposition.energy_rank`, applied to
  exact spectra and maximised over the rows (samples).
  """
  total = spectra.sum(axis=1, keepdims=True)
  residual = total - np.cumsum(spectra, axis=1)
  ok = residual <= tau * total
  return int(np.max(np.argmax(ok, axis=1) + 1))


def rank_cap(config: DecompositionConfig, channels: int, pixels: int) -> int:
  """The largest calibrated rank: ``max_rank`` if set, and always below ``min(C, HW)``.

  A site stays split (the mode the untrusted side planned for), so its rank
  must leave a residual.
  """
  cap = min(channels, pixels) - 1
  if config.max_rank is not None:
    cap = min(cap, config.max_rank)
  return max(1, cap)


def calibrated_ranks(config: DecompositionConfig, sites: Mapping, xs: Mapping[str, np.ndarray]
                     ) -> dict[str, int]:
  """Static ranks of the split sites among ``xs``.

  Args:
    config: the decomposition settings (``tau``, ``min_rank``, ``max_rank``).
    sites: the plan's :class:`asymml_jax.plan.SitePlan` per site.
    xs: activations of some sites on the calibration batch.

  Returns:
    ``{site: r}`` for every split site in ``xs``, each in
    ``[min_rank, rank_cap]``.
  """
  out = {}
  for site, x in xs.items():
    sp = sites[site]
    if not sp.split:
      continue
    need = needed_rank(energy_spectra(x, sp.mode), config.tau)
    cap = rank_cap(config, sp.channels, sp.height * sp.width)
    out[site] = int(min(max(need, config.min_rank), cap))
  return out

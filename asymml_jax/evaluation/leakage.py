"""Measured leakage: mutual information between inputs and exposed tensors (DESIGN section 7).

DESIGN section 7 ("Empirical leakage") asks for the mutual information between
the inputs and every tensor class the untrusted side sees, over the data set,
reported against the dense (GPU-only) exposure.  This module is the estimator
layer of that measurement; it knows nothing of models or of JAX.

* :func:`ksg_mutual_information`: the Kraskov-Stoegbauer-Grassberger k-nearest-
  neighbour estimator (KSG 2004, estimator 1) of ``I(X; Y)`` for multivariate
  continuous samples, rows = data points.
* :func:`pca_project`: flatten, standardise and project a batch of tensors onto
  its top principal components (KSG needs low dimension: its bias grows with
  the dimension of the joint space).
* :func:`mutual_information`: the estimate the experiments report, PCA to
  ``dim`` components on both sides, then KSG.
* :func:`gaussian_channel_bound`: the analytic upper bound on what one clipped,
  noised residual release ``clip_c(R) + N(0, (sigma c)^2 I)`` can carry about
  the example, ``<= 1 / (2 sigma^2)`` nats per release.
* :func:`correlated_gaussians` and :func:`estimator_sanity_check`: synthetic
  pairs with known mutual information ``-dim/2 log(1 - rho^2)``.

What the numbers mean.  The data-processing inequality gives ``I(P X; Q Y) <=
I(X; Y)`` for the PCA projections ``P``, ``Q``, so the *true* mutual information
of the projections is a lower bound on the leakage of the full tensors; the
KSG estimate of it carries the estimator's own bias (small and positive near
zero, negative, i.e. underestimating, for strongly dependent high-dimensional
pairs; see KSG 2004, section IV, and the module's tests).  The projection is
fitted on the same samples it projects unless ``fit_on`` is given.  The
estimates are therefore a *measured lower-bound proxy*, to be compared across
exposures (dense vs. decomposed vs. DP) on the same data, ``dim``, ``k`` and
``n``, and against the analytic bound of the DP release.

Randomness is explicit (DESIGN section 11): functions that draw take a numpy
``Generator`` or an integer seed.  The KSG jitter only breaks ties, at a
relative scale of ``1e-10``; its ``rng`` defaults to a fixed seed (``0``) so
that estimates are reproducible without global state.

References:
  A. Kraskov, H. Stoegbauer, P. Grassberger, "Estimating mutual information",
  Phys. Rev. E 69, 066138 (2004).
  T. M. Cover, J. A. Thomas, "Elements of Information Theory", 2nd ed.,
  sections 9.4 (parallel Gaussian channels) and 2.5 (chain rule).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
from scipy import spatial
from scipy import special
from sklearn import decomposition
from sklearn import preprocessing

_JITTER = 1e-10  # relative tie-breaking noise, as in scikit-learn's mutual_info_*
_DEFAULT_JITTER_SEED = 0
# PCA solvers of pca_project: "exact" (deterministic full eigen/SVD solver) or
# "randomized" (Halko et al. randomized SVD, fixed seed: the same components
# to within its power-iteration accuracy, much faster for wide tensors).
PCA_SOLVERS: tuple[str, ...] = ("exact", "randomized")
_RANDOMIZED_SEED = 0


# ----------------------------------------------------------------------------
# Validation helpers.
# ----------------------------------------------------------------------------


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _as_generator(rng, *, default_seed: int | None) -> np.random.Generator:
  """A numpy Generator from ``rng`` (Generator or int seed); never global state."""
  if rng is None:
    if default_seed is None:
      raise ValueError("rng is required: pass a numpy Generator or an int seed")
    return np.random.default_rng(default_seed)
  if isinstance(rng, np.random.Generator):
    return rng
  if _is_int(rng):
    return np.random.default_rng(int(rng))
  raise ValueError(
      f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def _as_float_array(a, name: str) -> np.ndarray:
  try:
    arr = np.asarray(a, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a numeric array: {e}") from None
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} contains non-finite values (nan or inf)")
  return arr


def _as_samples(a, name: str) -> np.ndarray:
  """``a`` as a finite float64 ``(n, d)`` array of n samples (rows)."""
  arr = _as_float_array(a, name)
  if arr.ndim != 2:
    raise ValueError(
        f"{name} must be 2-D (n samples, d features), got shape {arr.shape}; "
        "reshape 1-D data to (n, 1)")
  if arr.shape[0] < 1 or arr.shape[1] < 1:
    raise ValueError(f"{name} must be non-empty, got shape {arr.shape}")
  return arr


def _flatten(a, name: str) -> np.ndarray:
  """``a`` of shape ``(n, ...)`` flattened to a finite float64 ``(n, prod(...))``."""
  arr = _as_float_array(a, name)
  if arr.ndim < 2:
    raise ValueError(
        f"{name} must have shape (n, ...) with at least one feature axis, "
        f"got shape {arr.shape}")
  arr = arr.reshape(arr.shape[0], -1)
  if arr.shape[0] < 1 or arr.shape[1] < 1:
    raise ValueError(f"{name} must be non-empty, got {arr.shape[0]} samples of "
                     f"{arr.shape[1]} features")
  return arr


def _check_positive_int(v, name: str) -> int:
  if not (_is_int(v) and v >= 1):
    raise ValueError(f"{name} must be an int >= 1, got {v!r}")
  return int(v)


# ----------------------------------------------------------------------------
# The KSG estimator.
# ----------------------------------------------------------------------------


def _standardise_and_jitter(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Unit variance per column, then ``1e-10``-relative Gaussian jitter.

  The same preprocessing as scikit-learn's ``mutual_info_regression``
  (``scale(with_mean=False)`` and its tie-breaking noise, "as advised in
  Kraskov et al."): it makes the estimate exactly invariant under invertible
  per-coordinate scaling, which the max-norm neighbour search alone is not.
  """
  std = a.std(axis=0)
  std = np.where(std < 10 * np.finfo(np.float64).eps, 1.0, std)  # constant columns
  a = a / std
  mean_abs = np.maximum(1.0, np.mean(np.abs(a), axis=0))
  return a + _JITTER * mean_abs * rng.standard_normal(a.shape)


def ksg_mutual_information(x, y, *, k: int = 3, rng=None) -> float:
  r"""KSG estimate of the mutual information ``I(X; Y)`` in nats.

  Implements estimator 1 of Kraskov, Stoegbauer and Grassberger (KSG 2004,
  eq. 8):

  .. math::

     \hat I(X; Y) = \psi(k) + \psi(N)
                    - \langle \psi(n_x + 1) + \psi(n_y + 1) \rangle,

  where, for each point ``i``, ``eps_i / 2`` is the max-norm distance from
  ``z_i = (x_i, y_i)`` to its ``k``-th nearest neighbour in the joint space
  ``(X, Y)`` with ``||z - z'|| = max(||x - x'||, ||y - y'||)`` (each marginal
  distance itself a max-norm), and ``n_x(i)`` (``n_y(i)``) counts the other
  points strictly closer than ``eps_i / 2`` to ``x_i`` (``y_i``) in the
  marginal space.  Neighbour searches use ``scipy.spatial.cKDTree`` with
  ``p = inf``.

  Like scikit-learn's ``mutual_info_regression`` (which implements this same
  estimator for a 1-D feature and a 1-D target), every column is first scaled
  to unit variance and a tiny jitter (``1e-10`` relative, from ``rng``) breaks
  ties; negative estimates (the estimator's noise around ``I = 0``) are clamped
  to ``0``.  Standardising makes the estimate invariant under invertible
  per-coordinate scaling (exactly, up to the jitter); it is not invariant under
  general invertible maps, although ``I(X; Y)`` is.

  Rows are data points: ``x[i]`` and ``y[i]`` are two views of the same
  example (e.g. a projected input image and the projected tensor the
  untrusted side saw for it), not pixels of one image.

  Args:
    x: ``(n, dx)`` samples of ``X``.
    y: ``(n, dy)`` samples of ``Y``, paired row by row with ``x``.
    k: number of neighbours, ``1 <= k < n``.  KSG recommend small ``k`` (2-4):
      lower bias, higher variance.
    rng: numpy ``Generator`` or int seed for the jitter; ``None`` uses the fixed
      seed ``0`` (reproducible; the jitter only breaks ties).

  Returns:
    The estimate in nats, ``>= 0``.

  Raises:
    ValueError: if ``x`` or ``y`` is not a finite 2-D array, their numbers of
      rows differ, or ``k`` is not an int with ``1 <= k < n``.
  """
  x = _as_samples(x, "x")
  y = _as_samples(y, "y")
  if x.shape[0] != y.shape[0]:
    raise ValueError(
        f"x and y must have the same number of samples (rows), got "
        f"{x.shape[0]} and {y.shape[0]}")
  n = x.shape[0]
  k = _check_positive_int(k, "k")
  if n <= k:
    raise ValueError(f"need more samples than neighbours: n = {n} <= k = {k}")
  gen = _as_generator(rng, default_seed=_DEFAULT_JITTER_SEED)
  x = _standardise_and_jitter(x, gen)
  y = _standardise_and_jitter(y, gen)

  joint = np.concatenate([x, y], axis=1)
  # k + 1: the query returns each point itself first, at distance 0.
  dist, _ = spatial.cKDTree(joint).query(joint, k=k + 1, p=np.inf)
  # Strictly closer than the k-th neighbour: shrink the radius by one ulp, as
  # query_ball_point counts distances <= r.
  radius = np.nextafter(dist[:, -1], 0.0)
  n_x = spatial.cKDTree(x).query_ball_point(
      x, radius, p=np.inf, return_length=True) - 1
  n_y = spatial.cKDTree(y).query_ball_point(
      y, radius, p=np.inf, return_length=True) - 1
  mi = (special.digamma(n) + special.digamma(k)
        - np.mean(special.digamma(n_x + 1.0))
        - np.mean(special.digamma(n_y + 1.0)))
  return max(0.0, float(mi))


# ----------------------------------------------------------------------------
# Projection and the estimate the experiments use.
# ----------------------------------------------------------------------------


def pca_project(a, dim: int, *, fit_on=None, solver: str = "exact") -> np.ndarray:
  """Flatten, standardise and project onto the top ``dim`` principal components.

  Each sample ``a[i]`` (any shape) is flattened to a vector; every feature is
  standardised (zero mean, unit variance; constant features are only centred)
  with scikit-learn's ``StandardScaler``, and the result is projected onto the
  ``dim`` leading principal components from scikit-learn's ``PCA`` with an
  exact, deterministic solver (``covariance_eigh`` when there are no more
  features than fitting samples, else the full SVD).

  Both the standardisation and the components are fitted on ``fit_on`` when
  given (e.g. an attacker-held split, disjoint from the victim data ``a``,
  DESIGN section 7), else on ``a`` itself.

  ``solver='randomized'`` uses scikit-learn's randomized SVD (Halko, Martinsson
  and Tropp 2011; ``svd_solver='randomized'`` with a fixed ``random_state``, so
  still deterministic) instead: the leading components to within its power-
  iteration accuracy, at ``O(n d dim)`` instead of ``O(n d min(n, d))`` cost;
  for the wide tensors (thousands of features) of the leakage experiments.

  Args:
    a: ``(n, ...)`` samples to project.
    dim: number of components, ``1 <= dim <= min(n_fit, features)``.
    fit_on: optional ``(m, ...)`` samples, with the same per-sample size as
      ``a``, to fit the standardisation and the PCA on.
    solver: ``"exact"`` (default) or ``"randomized"`` (see above).

  Returns:
    ``(n, dim)`` float64 projections.

  Raises:
    ValueError: for non-finite or malformed inputs, mismatched per-sample sizes,
      an out-of-range ``dim`` or an unknown ``solver``.
  """
  if solver not in PCA_SOLVERS:
    raise ValueError(f"solver must be one of {PCA_SOLVERS}, got {solver!r}")
  a2 = _flatten(a, "a")
  fit = a2 if fit_on is None else _flatten(fit_on, "fit_on")
  if fit.shape[1] != a2.shape[1]:
    raise ValueError(
        f"fit_on has {fit.shape[1]} features per sample, a has {a2.shape[1]}")
  dim = _check_positive_int(dim, "dim")
  if dim > min(fit.shape):
    raise ValueError(
        f"dim = {dim} exceeds min(fitting samples, features) = {min(fit.shape)} "
        f"(fitting data of shape {fit.shape})")
  scaler = preprocessing.StandardScaler().fit(fit)
  fit_std = scaler.transform(fit)
  if solver == "randomized":
    pca = decomposition.PCA(n_components=dim, svd_solver="randomized",
                            random_state=_RANDOMIZED_SEED).fit(fit_std)
  else:
    exact = "covariance_eigh" if fit.shape[1] <= fit.shape[0] else "full"
    pca = decomposition.PCA(n_components=dim, svd_solver=exact).fit(fit_std)
  return pca.transform(scaler.transform(a2))


def mutual_information(inputs, exposed, *, dim: int = 8, k: int = 3,
                       rng=None, solver: str = "exact") -> dict[str, Any]:
  """Measured leakage ``I(inputs; exposed)``: PCA to ``dim`` components, then KSG.

  The estimator of DESIGN section 7 ("Empirical leakage"): both tensors are
  projected with :func:`pca_project` (each fitted on itself) to
  ``min(dim, features, n)`` components, and :func:`ksg_mutual_information`
  estimates the mutual information of the projections.  By data processing
  the projections' true mutual information lower-bounds that of the full
  tensors; see the module docstring for the estimator's bias.  Compare
  exposures only at equal ``dim``, ``k`` and ``n``.

  Args:
    inputs: ``(n, ...)`` the examples (e.g. images).
    exposed: ``(n, ...)`` what the untrusted side saw for each example (e.g. a
      released residual), row ``i`` paired with ``inputs[i]``.
    dim: PCA components per side (capped at the tensor's size and ``n``).
    k: KSG neighbours.
    rng: numpy ``Generator`` or int seed for the KSG jitter (default: seed 0).
    solver: PCA solver of :func:`pca_project` (``"exact"`` or ``"randomized"``).

  Returns:
    ``{"mi_nats": float, "dim": dim, "k": k, "n": n, "dim_inputs": int,
    "dim_exposed": int}``, the last two being the numbers of components
    actually used on each side.

  Raises:
    ValueError: for non-finite or malformed inputs or mismatched ``n``.
  """
  x = _flatten(inputs, "inputs")
  y = _flatten(exposed, "exposed")
  if x.shape[0] != y.shape[0]:
    raise ValueError(
        f"inputs and exposed must have the same number of samples, got "
        f"{x.shape[0]} and {y.shape[0]}")
  dim = _check_positive_int(dim, "dim")
  k = _check_positive_int(k, "k")
  n = x.shape[0]
  if n <= k:
    raise ValueError(f"need more samples than neighbours: n = {n} <= k = {k}")
  dim_x = min(dim, *x.shape)
  dim_y = min(dim, *y.shape)
  mi = ksg_mutual_information(pca_project(x, dim_x, solver=solver),
                              pca_project(y, dim_y, solver=solver), k=k, rng=rng)
  return {"mi_nats": mi, "dim": dim, "k": k, "n": n,
          "dim_inputs": dim_x, "dim_exposed": dim_y}


# ----------------------------------------------------------------------------
# The analytic bound for the DP release.
# ----------------------------------------------------------------------------


def gaussian_channel_bound(*, clip: float, noise_multiplier: float,
                           releases: int = 1, dim: int | None = None) -> float:
  r"""Upper bound in nats on ``I(X; clip_c(R) + N(0, (sigma c)^2 I))`` for one example.

  The release of DESIGN section 7: a residual ``R = R(X)`` of ``d`` elements,
  clipped to L2 norm ``c`` (``S = clip_c(R)``, so ``||S||^2 <= c^2`` always)
  and perturbed with independent noise ``Z ~ N(0, sigma^2 c^2 I_d)``, giving
  ``Y = S + Z``.

  Derivation.  ``X -> S -> Y`` is a Markov chain, so ``I(X; Y) <= I(S; Y)``
  (data processing).  ``Y = S + Z`` is ``d`` parallel Gaussian channels with
  equal noise power ``N = sigma^2 c^2`` under the total power constraint
  ``E||S||^2 <= c^2``; its capacity (Cover and Thomas, section 9.4: water-
  filling over equal noise levels spreads the power evenly, ``c^2 / d`` per
  channel) is

  .. math::

     C_d = \frac{d}{2} \log\left(1 + \frac{c^2 / d}{\sigma^2 c^2}\right)
         = \frac{d}{2} \log\left(1 + \frac{1}{d \sigma^2}\right),

  independent of ``c`` (the noise scales with the clip).  ``C_d`` increases in
  ``d`` (``t log(1 + a / t)`` is increasing in ``t``) towards its limit
  ``1 / (2 sigma^2)``, so for any residual size

  .. math::  I(X; Y) \le C_d \le \frac{1}{2 \sigma^2}.

  For ``L`` releases ``Y_1..Y_L`` of the example, each with fresh noise (and
  each possibly depending on ``X`` and the earlier releases, as the next
  layer's residual does), the chain rule gives ``I(X; Y_1..Y_L) = sum_l
  I(X; Y_l | Y_<l)``, and each term is at most ``C_d``: given the past,
  ``Y_l`` is still ``S_l + Z_l`` with ``||S_l|| <= c`` and ``Z_l``
  independent of everything else.  Hence ``I <= L C_d <= L / (2 sigma^2)``.
  With ``sigma = 0`` nothing is bounded (``inf``).

  Args:
    clip: the L2 bound ``c > 0`` (validated; the bound does not depend on it).
    noise_multiplier: ``sigma >= 0``.
    releases: ``L >= 1``, the number of releases about the example (e.g.
      releases per step times the steps in which the example was sampled).
    dim: optional residual size ``d >= 1`` for the tighter ``C_d``; ``None``
      gives the dimension-free ``1 / (2 sigma^2)`` per release.

  Returns:
    The bound in nats (``math.inf`` for ``sigma = 0``).

  Raises:
    ValueError: for ``clip <= 0``, ``sigma < 0``, non-finite values,
      ``releases < 1`` or ``dim < 1``.

  >>> gaussian_channel_bound(clip=1.0, noise_multiplier=1.0)
  0.5
  >>> round(gaussian_channel_bound(clip=1.0, noise_multiplier=1.0, dim=1), 4)
  0.3466
  """
  if not (_is_real(clip) and math.isfinite(clip) and clip > 0):
    raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
  if not (_is_real(noise_multiplier) and math.isfinite(noise_multiplier)
          and noise_multiplier >= 0):
    raise ValueError(
        f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
  releases = _check_positive_int(releases, "releases")
  if dim is not None:
    dim = _check_positive_int(dim, "dim")
  if noise_multiplier == 0:
    return math.inf
  inv_var = 1.0 / float(noise_multiplier) ** 2
  if dim is None:
    per_release = 0.5 * inv_var
  else:
    per_release = 0.5 * dim * math.log1p(inv_var / dim)
  return releases * per_release


# ----------------------------------------------------------------------------
# Synthetic data with known mutual information.
# ----------------------------------------------------------------------------


def correlated_gaussians(n: int, dim: int, rho: float, *,
                         rng) -> tuple[np.ndarray, np.ndarray, float]:
  """Pairs of ``dim``-dimensional Gaussians with correlation ``rho`` per coordinate.

  ``x ~ N(0, I)`` and ``y = rho x + sqrt(1 - rho^2) z`` with ``z ~ N(0, I)``
  independent, so the coordinate pairs ``(x_j, y_j)`` are independent
  bivariate normals with correlation ``rho`` and

      I(X; Y) = sum_j -1/2 log(1 - rho^2) = -dim/2 log(1 - rho^2)  nats

  (Cover and Thomas, example 8.5.1; the KSG paper's test case).

  Args:
    n: number of samples, ``>= 1``.
    dim: dimension of each of ``x`` and ``y``, ``>= 1``.
    rho: correlation, ``-1 < rho < 1``.
    rng: numpy ``Generator`` or int seed (required).

  Returns:
    ``(x, y, true_mi)``: two ``(n, dim)`` float64 arrays and the analytic
    mutual information in nats.

  Raises:
    ValueError: for ``n < 1``, ``dim < 1``, ``|rho| >= 1`` or a missing
      ``rng``.

  >>> x, y, mi = correlated_gaussians(5, 2, 0.5, rng=0)
  >>> x.shape, y.shape, round(mi, 4)
  ((5, 2), (5, 2), 0.2877)
  """
  n = _check_positive_int(n, "n")
  dim = _check_positive_int(dim, "dim")
  if not (_is_real(rho) and -1.0 < rho < 1.0):
    raise ValueError(f"rho must be a number in (-1, 1), got {rho!r}")
  gen = _as_generator(rng, default_seed=None)
  x = gen.standard_normal((n, dim))
  z = gen.standard_normal((n, dim))
  y = rho * x + math.sqrt(1.0 - rho * rho) * z
  true_mi = -0.5 * dim * math.log1p(-rho * rho)
  return x, y, true_mi


def estimator_sanity_check(*, rng, n: int = 2000,
                           dims: tuple[int, ...] = (1, 2, 4),
                           rhos: tuple[float, ...] = (0.0, 0.5, 0.9),
                           k: int = 3) -> list[dict[str, float]]:
  """KSG estimates against the analytic truth on :func:`correlated_gaussians`.

  For the experiments to print next to their leakage numbers: the estimator's
  bias at the sample size and dimension they use.

  Args:
    rng: numpy ``Generator`` or int seed (required).
    n: samples per case.
    dims: dimensions of ``x`` and ``y`` (the joint space has ``2 dim``).
    rhos: correlations.
    k: KSG neighbours.

  Returns:
    One ``{"dim", "rho", "n", "k", "true_nats", "ksg_nats", "error_nats"}`` per
    ``(dim, rho)``.
  """
  gen = _as_generator(rng, default_seed=None)
  rows = []
  for dim in dims:
    for rho in rhos:
      x, y, truth = correlated_gaussians(n, dim, rho, rng=gen)
      est = ksg_mutual_information(x, y, k=k, rng=gen)
      rows.append({"dim": dim, "rho": rho, "n": n, "k": k, "true_nats": truth,
                    "ksg_nats": est, "error_nats": est - truth})
  return rows

"""Tests of asymml_jax.privacy.accounting (DESIGN section 7, "Accounting").

All PLD numbers use the module's default discretisation (1e-3), which keeps
every call under ~0.5 s; the reference values are computed here with
``dp_accounting`` directly, with the same discretisation.
"""

from __future__ import annotations

import doctest
import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from asymml_jax.privacy import accounting

DELTA = 1e-5
MNIST_Q = 64 / 4500  # batch 64 of N = 4500

CASES = [  # (sigma, q, steps, L)
    (1.0, 0.01, 100, 1),
    (0.8, 0.02, 200, 3),
    (2.0, MNIST_Q, 700, 7),
    (1.5, 0.05, 50, 4),
]


def _direct_pld(sigma, q, steps, L, delta=DELTA):
  """The run built by hand: SelfComposed(PoissonSampled(q, Gaussian(sigma/sqrt(L))))."""
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(sigma / math.sqrt(L))), steps)
  acc = pld_privacy_accountant.PLDAccountant(
      value_discretization_interval=accounting.DEFAULT_VALUE_DISCRETIZATION)
  return acc.compose(event).get_epsilon(delta)


def _eps(sigma, q, steps, L, **kw):
  return accounting.epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps,
                            releases_per_step=L, delta=kw.pop("delta", DELTA),
                            **kw)


@pytest.mark.parametrize("sigma, q, steps, L", CASES)
def test_epsilon_matches_dp_accounting_directly(sigma, q, steps, L):
  assert _eps(sigma, q, steps, L) == pytest.approx(_direct_pld(sigma, q, steps, L),
                                                   abs=5e-5)


@pytest.mark.parametrize("sigma, q, steps, L", CASES)
def test_rdp_accountant_agrees_and_is_looser(sigma, q, steps, L):
  event = accounting.run_event(noise_multiplier=sigma, sampling_rate=q,
                               steps=steps, releases_per_step=L)
  direct = rdp_privacy_accountant.RdpAccountant().compose(event).get_epsilon(DELTA)
  rdp = _eps(sigma, q, steps, L, accountant="rdp")
  assert rdp == pytest.approx(direct, abs=5e-5)
  assert rdp >= _eps(sigma, q, steps, L) - 1e-3  # PLD is the tighter bound


def test_step_event_structure():
  """Subsampling wraps the L releases: PoissonSampled(q, Gaussian(sigma/sqrt(L)))."""
  ev = accounting.step_event(noise_multiplier=2.0, sampling_rate=0.1,
                             releases_per_step=4)
  assert isinstance(ev, dp_accounting.PoissonSampledDpEvent)
  assert ev.sampling_probability == 0.1
  assert isinstance(ev.event, dp_accounting.GaussianDpEvent)
  assert ev.event.noise_multiplier == pytest.approx(1.0)
  run = accounting.run_event(noise_multiplier=2.0, sampling_rate=0.1, steps=9,
                             releases_per_step=4)
  assert isinstance(run, dp_accounting.SelfComposedDpEvent)
  assert run.count == 9 and run.event == ev


@pytest.mark.parametrize("sigma, q, steps, L", CASES[1:])
def test_l_releases_equal_one_release_at_sigma_over_sqrt_l(sigma, q, steps, L):
  """Identity: L releases at sigma == one release at sigma / sqrt(L)."""
  assert _eps(sigma, q, steps, L) == pytest.approx(
      _eps(sigma / math.sqrt(L), q, steps, 1), abs=1e-9)


@pytest.mark.parametrize("sigma, L", [(1.0, 2), (2.0, 7), (4.0, 16)])
def test_gaussian_composition_identity_independently(sigma, L):
  """The identity behind step_event, checked two ways that do not assume it.

  (a) RDP: a Gaussian of multiplier s has RDP alpha / (2 s^2), additive under
  composition, so L compositions at sigma have exactly the RDP curve of one at
  sigma / sqrt(L): the accountant's epsilons agree to rounding.
  (b) Exact: the analytic Gaussian epsilon (Balle & Wang 2018) at
  sigma / sqrt(L) bounds what our (pessimistic) PLD reports for q = 1, one step.
  """
  composed = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(sigma)] * L)
  single = dp_accounting.GaussianDpEvent(sigma / math.sqrt(L))
  e_comp = rdp_privacy_accountant.RdpAccountant().compose(composed).get_epsilon(DELTA)
  e_single = rdp_privacy_accountant.RdpAccountant().compose(single).get_epsilon(DELTA)
  assert e_comp == pytest.approx(e_single, rel=1e-9)

  exact = dp_accounting.get_epsilon_gaussian(sigma / math.sqrt(L), DELTA)
  ours = _eps(sigma, 1.0, 1, L)
  assert exact - 1e-6 <= ours <= exact + 0.01


def test_wrapping_each_release_separately_would_understate_epsilon():
  """Sampling each of the L releases independently (the wrong model) gives less."""
  sigma, q, steps, L = 1.0, 0.02, 200, 4
  wrong = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
      steps * L)
  acc = pld_privacy_accountant.PLDAccountant(
      value_discretization_interval=accounting.DEFAULT_VALUE_DISCRETIZATION)
  assert acc.compose(wrong).get_epsilon(DELTA) < _eps(sigma, q, steps, L) - 0.1


@pytest.mark.parametrize("target", [1.0, 2.0, 4.0, 8.0])
def test_calibrate_then_recompute(target):
  kw = dict(sampling_rate=0.02, steps=200, releases_per_step=3)
  sigma = accounting.calibrate_noise_multiplier(target_epsilon=target,
                                                delta=DELTA, **kw)
  eps = accounting.epsilon(noise_multiplier=sigma, delta=DELTA, **kw)
  assert eps <= target
  assert round(eps, 4) == target
  # A slightly smaller sigma misses the target: sigma is (near) the smallest.
  assert accounting.epsilon(noise_multiplier=sigma * 0.999, delta=DELTA,
                            **kw) > target


def test_calibrate_large_target_brackets_below_one():
  # Here eps(1) ~ 1.7 and eps(0.5) ~ 8.6: the bracket search must halve.
  kw = dict(sampling_rate=0.05, steps=10, releases_per_step=1)
  sigma = accounting.calibrate_noise_multiplier(target_epsilon=4.0, delta=DELTA,
                                                **kw)
  assert 0.5 < sigma < 1.0
  eps = accounting.epsilon(noise_multiplier=sigma, delta=DELTA, **kw)
  assert eps <= 4.0 and round(eps, 4) == 4.0


def test_calibrate_with_rdp():
  kw = dict(sampling_rate=0.02, steps=200, releases_per_step=3)
  sigma = accounting.calibrate_noise_multiplier(target_epsilon=3.0, delta=DELTA,
                                                accountant="rdp", **kw)
  eps = accounting.epsilon(noise_multiplier=sigma, delta=DELTA, accountant="rdp",
                           **kw)
  assert eps <= 3.0 and round(eps, 4) == 3.0
  pld_sigma = accounting.calibrate_noise_multiplier(target_epsilon=3.0,
                                                    delta=DELTA, **kw)
  assert pld_sigma < sigma  # the tighter accountant needs less noise


def test_monotone_in_steps_and_sigma():
  by_steps = [_eps(1.0, 0.02, s, 2) for s in (10, 50, 200, 800)]
  assert all(a < b for a, b in zip(by_steps, by_steps[1:]))
  by_sigma = [_eps(s, 0.02, 200, 2) for s in (0.7, 1.0, 2.0, 4.0)]
  assert all(a > b for a, b in zip(by_sigma, by_sigma[1:]))
  by_l = [_eps(1.0, 0.02, 200, L) for L in (1, 2, 4)]
  assert all(a < b for a, b in zip(by_l, by_l[1:]))


def test_zero_noise_is_infinite_and_nothing_released_is_zero():
  assert _eps(0.0, 0.02, 100, 3) == math.inf
  assert _eps(0.0, 0.02, 100, 3, accountant="rdp") == math.inf
  assert _eps(1.0, 0.02, 0, 3) == 0.0
  assert _eps(0.0, 0.0, 100, 3) == 0.0
  assert accounting.calibrate_noise_multiplier(
      target_epsilon=1.0, delta=DELTA, sampling_rate=0.02, steps=0,
      releases_per_step=3) == 0.0


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(sampling_rate=1.5), "sampling_rate"),
    (dict(steps=-1), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(releases_per_step=0), "releases_per_step"),
    (dict(delta=0.0), "delta"),
    (dict(delta=1.0), "delta"),
    (dict(accountant="moments"), "accountant"),
])
def test_bad_arguments_raise(kwargs, pattern):
  args = dict(noise_multiplier=1.0, sampling_rate=0.01, steps=10,
              releases_per_step=1, delta=DELTA)
  args.update(kwargs)
  with pytest.raises(ValueError, match=pattern):
    accounting.epsilon(**args)


@pytest.mark.parametrize("target, tol", [(0.0, 1e-5), (-1.0, 1e-5), (math.inf, 1e-5),
                                         (1.0, 0.0)])
def test_calibrate_bad_arguments_raise(target, tol):
  with pytest.raises(ValueError):
    accounting.calibrate_noise_multiplier(target_epsilon=target, delta=DELTA,
                                          sampling_rate=0.01, steps=10,
                                          releases_per_step=1, tol=tol)


def test_doctests():
  result = doctest.testmod(accounting)
  assert result.attempted > 0
  assert result.failed == 0

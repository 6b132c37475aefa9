"""Calibrated static ranks: exact spectra, the rank rule, caps, and the plan they give."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from asymml_jax import calibration as cal
from asymml_jax import plan as plan_lib
from asymml_jax import sample_images
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.privacy.config import PrivacyConfig
from tests.helpers.tiny_model import tiny_staged_model


def _low_rank(b=3, h=6, w=5, c=8, rank=2, noise=1e-3, seed=0):
  rng = np.random.default_rng(seed)
  basis = rng.standard_normal((b, rank, c))
  coef = rng.standard_normal((b, h * w, rank))
  x = np.einsum("bnr,brc->bnc", coef, basis) + noise * rng.standard_normal((b, h * w, c))
  return x.reshape(b, h, w, c).astype(np.float32)


def test_energy_spectra_are_the_squared_singular_values():
  x = _low_rank(rank=3, noise=0.1)
  b, h, w, c = x.shape
  got = cal.energy_spectra(x, "per_sample")
  assert got.shape == (b, c)
  for i in range(b):
    sv = np.linalg.svd(x[i].reshape(h * w, c).astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(got[i], sv**2, rtol=1e-6, atol=1e-8)
  whole = cal.energy_spectra(x, "per_batch")
  sv = np.linalg.svd(x.reshape(-1, c).astype(np.float64), compute_uv=False)
  np.testing.assert_allclose(whole[0], sv**2, rtol=1e-6, atol=1e-8)


def test_needed_rank_is_the_smallest_meeting_tau_for_every_row():
  spectra = np.array([[6.0, 3.0, 1.0, 0.0],    # residual 4, 1, 0 of 10
                      [9.0, 0.5, 0.5, 0.0]])   # residual 1, 0.5, 0 of 10
  assert cal.needed_rank(spectra, 0.1) == 2    # row 0 needs 2, row 1 needs 1
  assert cal.needed_rank(spectra, 0.45) == 1
  assert cal.needed_rank(spectra[1:], 0.05) == 2
  assert cal.needed_rank(spectra, 0.0) == 3    # zero residual


def test_rank_cap_keeps_a_residual_and_honours_max_rank():
  assert cal.rank_cap(DecompositionConfig(), 16, 1024) == 15
  assert cal.rank_cap(DecompositionConfig(), 64, 4) == 3   # a 2x2 map
  assert cal.rank_cap(DecompositionConfig(max_rank=5), 64, 1024) == 5


def _sites():
  model = tiny_staged_model(input_shape=(16, 16, 3), channels=(8, 8, 8), norm="group")
  plan = plan_lib.make_plan(model, 2, DecompositionConfig(rank_plan="calibrate"),
                            force="per_sample")
  return model, plan


def test_calibrated_ranks_follow_the_data_within_bounds():
  model, plan = _sites()
  low = _low_rank(b=2, h=8, w=8, c=8, rank=2)
  full = np.random.default_rng(1).standard_normal((2, 8, 8, 8)).astype(np.float32)
  got = cal.calibrated_ranks(plan.decomposition, plan.sites, {"s1": low, "s2": full})
  assert got["s1"] == 2
  assert got["s2"] == 7  # white noise needs nearly every channel: capped below C = 8
  got = cal.calibrated_ranks(DecompositionConfig(rank_plan="calibrate", min_rank=3),
                             plan.sites, {"s1": low})
  assert got == {"s1": 3}


def test_calibrated_ranks_skip_sites_that_are_not_split():
  model = tiny_staged_model(input_shape=(16, 16, 3), channels=(8, 8), norm="group")
  plan = plan_lib.make_plan(model, 2, DecompositionConfig(rank_plan="calibrate"),
                            force="trusted")
  assert cal.calibrated_ranks(plan.decomposition, plan.sites,
                              {"s1": _low_rank(b=2, h=8, w=8, c=8)}) == {}


def test_with_ranks_recounts_costs_and_keeps_modes():
  model, plan = _sites()
  new = plan_lib.with_ranks(model, plan, {"s1": 5})
  assert new.sites["s1"].r_max == 5 and plan.sites["s1"].r_max == 1
  assert {s: p.mode for s, p in new.sites.items()} == {s: p.mode for s, p in plan.sites.items()}
  assert new.sites["s1"].trusted_macs > plan.sites["s1"].trusted_macs
  assert new.sites["s2"] == plan.sites["s2"]
  with pytest.raises(ValueError, match="must be in"):
    plan_lib.with_ranks(model, plan, {"s1": 8})
  trusted = plan_lib.make_plan(model, 2, DecompositionConfig(), force="trusted")
  with pytest.raises(ValueError, match="only split sites"):
    plan_lib.with_ranks(model, trusted, {"s1": 2})


def test_calibration_is_refused_with_dp_and_needs_tau():
  model, _ = _sites()
  with pytest.raises(ValueError, match="rank_plan='calibrate'"):
    plan_lib.make_plan(model, 2, DecompositionConfig(rank_plan="calibrate"),
                       privacy=PrivacyConfig(enabled=True, noise_multiplier=1.0))
  with pytest.raises(ValueError, match="tau > 0"):
    DecompositionConfig(rank_plan="calibrate", tau=0.0)
  with pytest.raises(ValueError, match="rank_plan must be one of"):
    DecompositionConfig(rank_plan="exact")


def test_photographs_need_fewer_channels_than_noise():
  """Why calibration is measured on real content: an image's first conv output has
  most of its energy in a few channels, white noise in none."""
  model, plan = _sites()
  v = model.init(jax.random.key(0))
  from asymml_jax import ops  # pylint: disable=g-import-not-at-top
  spec = model.groups[0][0]

  def site1(images):
    y = ops.conv(images, v["params"]["convs"]["conv0"]["kernel"], spec.strides, spec.padding)
    return np.maximum(np.asarray(y), 0.0)
  photos = sample_images.photo_batch(2, 16)
  noise = np.random.default_rng(0).standard_normal(photos.shape).astype(np.float32)
  r_photo = cal.calibrated_ranks(plan.decomposition, plan.sites, {"s1": site1(photos)})["s1"]
  r_noise = cal.calibrated_ranks(plan.decomposition, plan.sites, {"s1": site1(noise)})["s1"]
  assert r_photo < r_noise

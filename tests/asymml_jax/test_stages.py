"""Trusted stage and untrusted group functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asymml_jax import stages as st
from asymml_jax import verify
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.models import get_model
from asymml_jax.plan import make_plan


@pytest.fixture(scope="module")
def model():
  return get_model("resnet20", width=0.5)


def _stage0(model, plan, batch):
  v = model.init(jax.random.key(0))
  return st.trusted_stage(model, plan, 0, st.stage_params(model, v["params"], 0),
                          st.stage_stats(v["batch_stats"], 0), {}, st.empty_private(),
                          batch, jax.random.key(1), True)


def test_dense_plan_releases_the_activation(model):
  batch = verify.random_batch(model, 2)
  (rs, priv, loss), _ = _stage0(model, make_plan(model, 2, force="dense"), batch)
  np.testing.assert_array_equal(np.asarray(rs["input"]), batch["image"])
  assert loss is None and not priv["p"]


def test_trusted_site_releases_nothing_and_split_site_keeps_p_u(model):
  batch = verify.random_batch(model, 2)
  (rs, priv, _), _ = _stage0(model, make_plan(model, 2, force="trusted"), batch)
  assert rs == {} and "input" in priv["x"]
  (rs, priv, _), _ = _stage0(model, make_plan(model, 2, DecompositionConfig(rank_fraction=0.34),
                                              force="per_sample"), batch)
  assert set(rs) == {"input"} and set(priv["p"]) == {"input"}
  recon = rs["input"] + jnp.einsum("bhwr,bcr->bhwc", priv["p"]["input"], priv["u"]["input"])
  np.testing.assert_allclose(np.asarray(recon), batch["image"], atol=1e-5)


def test_untrusted_group_skips_trusted_sites_and_casts(model):
  plan = make_plan(model, 2, force="trusted")
  v = model.init(jax.random.key(0))
  assert st.untrusted_group(model, plan, 0, v["params"]["convs"], {}) == {}
  plan = make_plan(model, 2, force="dense")
  r = {"input": jnp.ones((2, 32, 32, 3))}
  out = st.untrusted_group(model, plan, 0, v["params"]["convs"], r, jnp.bfloat16)
  assert out["stem"].dtype == jnp.bfloat16 and out["stem"].shape == (2, 32, 32, 8)


def test_classification_loss_masks_padding():
  logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
  labels = jnp.array([0, 0, 1])
  loss, m = st.classification_loss(logits, labels, jnp.array([1.0, 1.0, 0.0]))
  assert float(m["count"]) == 2 and float(m["correct"]) == 1
  expected = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(2.0))) / 2
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_classification_loss_divides_by_the_expected_batch_size():
  logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
  labels = jnp.array([0, 0, 1])
  mask = jnp.array([1.0, 1.0, 0.0])
  by_count, _ = st.classification_loss(logits, labels, mask)
  fixed, m = st.classification_loss(logits, labels, mask, 4.0)
  assert float(fixed) == pytest.approx(float(m["loss_sum"]) / 4.0)
  assert float(by_count) == pytest.approx(float(m["loss_sum"]) / 2.0)


def test_dp_stage_releases_clipped_residual_plus_noise(model):
  """Stage-level DESIGN section 7: the released residual is clip(R) + N(0, (sigma c)^2)."""
  from scipy import stats

  from asymml_jax import decomposition as dec
  from asymml_jax.privacy.config import PrivacyConfig
  batch = verify.random_batch(model, 4)
  cfg = DecompositionConfig(rank_fraction=0.34)
  clip, sigma = 0.5, 0.8
  dp = PrivacyConfig(enabled=True, clip=clip, noise_multiplier=sigma)
  plain = make_plan(model, 4, cfg, force="per_sample")
  noisy = make_plan(model, 4, cfg, force="per_sample", privacy=dp)
  (rs_plain, priv_plain, _), _ = _stage0(model, plain, batch)
  (rs_dp, priv_dp, _), _ = _stage0(model, noisy, batch)
  r = rs_plain["input"]
  # Same subspace (same key), so the difference is clipping plus noise only.
  np.testing.assert_array_equal(np.asarray(priv_plain["u"]["input"]),
                                np.asarray(priv_dp["u"]["input"]))
  clipped = dec.clip_per_sample(r, clip)
  norms = jnp.linalg.norm(clipped.reshape(4, -1), axis=1)
  assert bool(jnp.all(norms <= clip * (1 + 1e-5)))
  assert float(jnp.min(jnp.linalg.norm(r.reshape(4, -1), axis=1))) > clip  # it did clip
  z = np.asarray(rs_dp["input"] - clipped, np.float64).ravel()
  std = sigma * clip
  assert stats.kstest(z, "norm", args=(0.0, std)).pvalue > 0.01
  for wrong in (2 / 3 * std, 3 / 2 * std):
    assert stats.kstest(z, "norm", args=(0.0, wrong)).pvalue < 1e-3
  # The TEE keeps exactly what it released (for its share of dW).
  np.testing.assert_array_equal(np.asarray(priv_dp["r"]["input"]), np.asarray(rs_dp["input"]))


def test_noise_and_gradient_keys_are_distinct_streams():
  key = jax.random.key(3)
  keys = [st.site_key(key, 0), st.site_key(key, 1), st.release_noise_key(key, 0),
          st.release_noise_key(key, 1), st.gradient_key(key, 0), st.gradient_key(key, 1)]
  data = {tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in keys}
  assert len(data) == len(keys)


def test_releases_per_step_counts_forward_and_gradient_releases(model):
  from asymml_jax.privacy.config import PrivacyConfig
  cfg = DecompositionConfig(rank_fraction=0.25)
  plan = make_plan(model, 2, cfg, force="per_sample")
  split = [s for s in plan.sites.values() if s.split]
  convs = sum(len(s.consumers) for s in split)
  assert plan.releases_per_step(train=True) == len(split) + convs
  assert plan.releases_per_step(train=False) == len(split)
  none = make_plan(model, 2, cfg, force="per_sample",
                   privacy=PrivacyConfig(gradient_protection="none"))
  assert none.releases_per_step(train=True) == len(split)
  assert make_plan(model, 2, force="trusted").releases_per_step() == 0

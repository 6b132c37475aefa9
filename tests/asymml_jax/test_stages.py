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

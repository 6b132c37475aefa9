"""The trusted executor: ordering, idempotency, state lifetime, errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from asymml_jax import stages as st
from asymml_jax import verify
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.executor import ExecutorError, TrustedExecutor
from asymml_jax.models import get_model
from asymml_jax.plan import make_plan


@pytest.fixture(scope="module")
def setup():
  model = get_model("vgg11", width=0.25)
  plan = make_plan(model, 2, DecompositionConfig(rank_fraction=0.25))
  v = model.init(jax.random.key(0))
  return model, plan, v, verify.random_batch(model, 2)


def test_forward_order_idempotency_and_private_outputs(setup):
  model, plan, v, batch = setup
  ex = TrustedExecutor(model, plan, jax.random.key(1))
  ex.begin(5, batch, train=False)
  with pytest.raises(ExecutorError, match="before stage 0"):
    ex.forward(5, 1, {}, st.stage_params(model, v["params"], 1), st.stage_stats(v["batch_stats"], 1))
  p0 = st.stage_params(model, v["params"], 0)
  rs, loss, metrics, _ = ex.forward(5, 0, {}, p0, st.stage_stats(v["batch_stats"], 0))
  again = ex.forward(5, 0, {}, p0, st.stage_stats(v["batch_stats"], 0))
  assert again[0] is rs  # a repeated (step, stage) returns the cached answer
  assert loss is None and metrics is None
  # Stage 0 of a 3-channel image at r_max 1 releases a residual, never the image.
  for site, r in rs.items():
    assert plan.sites[site].split
    assert not np.allclose(np.asarray(r), batch["image"])


def test_unknown_step_and_backward_errors(setup):
  model, plan, v, batch = setup
  ex = TrustedExecutor(model, plan, jax.random.key(1))
  with pytest.raises(ExecutorError, match="unknown step 3"):
    ex.forward(3, 0, {}, {}, {})
  ex.begin(3, batch, train=True)
  with pytest.raises(ExecutorError, match="before its forward"):
    ex.backward(3, 0, {}, None)
  ex.end(3)
  assert ex.open_steps == ()


def test_begin_rejects_wrong_image_shape(setup):
  model, plan, _, batch = setup
  ex = TrustedExecutor(model, plan, jax.random.key(1))
  with pytest.raises(ValueError, match="expects images"):
    ex.begin(0, dict(batch, image=batch["image"][:, :16]), train=True)


def _one_step(ex, model, plan, v, batch, *, overlap: bool, prefetch_stages=()):
  """Forward and backward of one training step through ``ex``, the untrusted groups
  computed here; fixed cotangents.  Returns the loss, every stage's residuals and
  ``dyr``, and the trusted parameter gradients summed into the whole tree's layout."""
  params, stats = v["params"], v["batch_stats"]
  ex.begin(0, batch, train=True)
  n = model.num_stages
  yr, rss, loss, served = {}, [], None, 0
  for k in range(n):
    pk = (st.boundary_params(model, plan, params, k) if overlap
          else st.stage_params(model, params, k))
    rs, loss, _, _ = ex.forward(0, k, yr, pk, st.stage_stats(stats, k))
    rss.append(rs)
    if k in prefetch_stages:
      served += ex.prefetch()
    if k < n - 1:
      yr = st.untrusted_group(model, plan, k, params["convs"], rs)
  rng = np.random.default_rng(7)
  total = jax.tree_util.tree_map(np.zeros_like, jax.device_get(params))
  dyrs = []
  for k in reversed(range(n)):
    drs = {s: rng.standard_normal(np.shape(r)).astype(np.float32) for s, r in rss[k].items()}
    dyr, dparams = ex.backward(0, k, drs, np.float32(1.0))
    dyrs.append(dyr)
    for name, g in dparams["convs"].items():
      for leaf, x in g.items():
        total["convs"][name][leaf] += np.asarray(x)
    for name, x in dparams.get("next", {}).items():
      total["convs"][name]["kernel"] += np.asarray(x)
    total["stages"][str(k)] = jax.tree_util.tree_map(
        lambda a, b: a + np.asarray(b), total["stages"][str(k)], dparams["stage"])
  assert ex.open_steps == ()
  return loss, rss, dyrs, total, served


@pytest.mark.slow  # 45 s of compilation; the central-invariant tests of the local
# (Y_L inside the stage) and enclave (Y_L prefetched) backends cover it too
def test_overlap_layout_gives_the_same_step(setup):
  """DESIGN section 3 step 3: kernels one call early and Y_L prefetched (or not)
  change nothing: loss, residuals, dY and every trusted parameter gradient."""
  model, plan, v, batch = setup
  ref = _one_step(TrustedExecutor(model, plan, jax.random.key(1)), model, plan, v, batch,
                  overlap=False)
  ex = TrustedExecutor(model, plan, jax.random.key(1), overlap=True)
  # Prefetch after some stages only: the others compute Y_L inside the stage.
  got = _one_step(ex, model, plan, v, batch, overlap=True,
                  prefetch_stages=range(0, model.num_stages, 2))
  assert got[4] >= 1  # some Y_L were computed ahead
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(got[1:4]), jax.tree_util.tree_leaves(ref[1:4])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # The split kernels' gradients are not all zero (the test would not see them lost).
  split = [c.name for k in range(model.num_stages) for c in st.split_convs(model, plan, k)]
  assert split and all(np.abs(got[3]["convs"][c]["kernel"]).sum() > 0 for c in split)


def test_boundary_layout_moves_split_kernels_one_stage_early(setup):
  model, plan, v, _ = setup
  params = v["params"]
  seen = {}
  for k in range(model.num_stages):
    b = st.boundary_params(model, plan, params, k)
    full = st.merge_boundary(b, seen)
    ref = st.stage_params(model, params, k)
    assert jax.tree_util.tree_structure(full) == jax.tree_util.tree_structure(ref)
    assert set(b["next"]) == {c.name for c in st.split_convs(model, plan, k)}
    seen = b["next"]
  n_split = sum(len(st.split_convs(model, plan, k)) for k in range(model.num_stages))
  n_next = sum(len(st.boundary_params(model, plan, params, k)["next"])
               for k in range(model.num_stages))
  assert n_split == n_next > 0


def _forward_loss(ex, model, v, batch, tag=0):
  params, stats = v["params"], v["batch_stats"]
  ex.begin(tag, batch, train=False)
  yr, loss = {}, None
  for k in range(model.num_stages):
    rs, loss, _, _ = ex.forward(tag, k, yr, st.boundary_params(model, ex.plan, params, k),
                                st.stage_stats(stats, k))
    if k < model.num_stages - 1:
      yr = st.untrusted_group(model, ex.plan, k, params["convs"], rs)
  return float(loss)


def test_calibrated_ranks_are_fixed_once_and_keep_the_loss():
  """rank_plan='calibrate': each split site compiles with the rank its first batch
  needs; any rank keeps the split exact, so the loss is the fraction plan's."""
  from asymml_jax import sample_images  # pylint: disable=g-import-not-at-top
  from tests.helpers.tiny_model import tiny_staged_model  # pylint: disable=g-import-not-at-top
  model = tiny_staged_model(input_shape=(16, 16, 3), channels=(16, 16, 8), norm="group")
  v = model.init(jax.random.key(0))
  batch = {"image": sample_images.photo_batch(2, 16), "label": np.array([0, 1], np.int32),
           "mask": np.ones(2, np.float32)}
  cfg = DecompositionConfig(rank_plan="calibrate", tau=0.05)
  plan = make_plan(model, 2, cfg, force="per_sample")
  ex = TrustedExecutor(model, plan, jax.random.key(1), overlap=True)
  loss = _forward_loss(ex, model, v, batch)
  split = [s for s, p in plan.sites.items() if p.split]
  assert set(ex.ranks) == set(split)
  assert {s: ex.plan.sites[s].r_max for s in split} == ex.ranks
  assert any(ex.ranks[s] != plan.sites[s].r_max for s in split)  # the data moved them
  assert ex.plan.sites["s0"].r_max == ex.ranks["s0"]
  ref = TrustedExecutor(model, make_plan(model, 2, DecompositionConfig(tau=0.05),
                                         force="per_sample"), jax.random.key(1), overlap=True)
  np.testing.assert_allclose(loss, _forward_loss(ref, model, v, batch), rtol=1e-5)
  # A second batch (noise: it would need more channels) does not recalibrate.
  first = dict(ex.ranks)
  noisy = dict(batch, image=np.random.default_rng(0).standard_normal((2, 16, 16, 3))
               .astype(np.float32))
  _forward_loss(ex, model, v, noisy, tag=1)
  assert ex.ranks == first


def test_evaluation_frees_what_earlier_stages_left(setup):
  """Inference keeps one stage's private state and answer at a time (enclave memory)."""
  model, plan, v, batch = setup
  ex = TrustedExecutor(model, plan, jax.random.key(1))
  ex.begin(9, batch, train=False)
  yr = {}
  for k in range(model.num_stages - 1):
    rs, _, _, _ = ex.forward(9, k, yr, st.stage_params(model, v["params"], k),
                             st.stage_stats(v["batch_stats"], k))
    s = ex._steps[9]  # pylint: disable=protected-access
    assert set(s.priv) == {k + 1} and set(s.outputs) == {k}
    assert ex.forward(9, k, yr, {}, {})[0] is rs  # the latest answer is still served
    yr = st.untrusted_group(model, plan, k, v["params"]["convs"], rs)
  with pytest.raises(ExecutorError, match="before stage"):
    ex.forward(9, 0, {}, st.stage_params(model, v["params"], 0), {})

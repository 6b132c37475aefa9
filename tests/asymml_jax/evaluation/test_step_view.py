"""Tests of asymml_jax.evaluation.step_view: what the untrusted side sees in one step.

One tiny two-conv model (sites ``s0`` 8x8x3 and ``s1`` 4x4x4) and three
compiled programs (dense, per-example split, DP at rank 3, where ``s0`` runs
fully trusted), each cached for the module.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asymml_jax import plan as plan_lib
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.evaluation import step_view as sv
from asymml_jax.privacy.config import PrivacyConfig
from enclave_bridge import ledger
from tests.helpers.tiny_model import tiny_staged_model

B = 3
RANK = 1
MODEL = tiny_staged_model()
FIXED = DecompositionConfig(rank_fraction=1.0, min_rank=RANK, max_rank=RANK, tau=0.0,
                            num_iters=1)


def _plan(force="per_sample", decomposition=FIXED, **privacy):
  return plan_lib.make_plan(MODEL, B, decomposition, force=force,
                            privacy=PrivacyConfig(**privacy), expected_batch_size=float(B))


DENSE = _plan("dense")
SPLIT = _plan()
# Rank 3 >= min(C = 3, HW) at s0: conv0 runs fully trusted; s1 (C = 4) still splits.
RANK3 = dataclasses.replace(FIXED, min_rank=3, max_rank=3)
SIGMA, CLIP, GRAD_CLIP = 2.0, 0.5, 1e-3
DP_RANK3 = _plan(decomposition=RANK3, enabled=True, clip=CLIP, grad_clip=GRAD_CLIP,
                 noise_multiplier=SIGMA)

VARIABLES = MODEL.init(jax.random.key(0))
PARAMS, STATS = VARIABLES["params"], VARIABLES["batch_stats"]
BATCH = {"image": jax.random.normal(jax.random.key(1), (B, *MODEL.input_shape)),
         "label": jnp.arange(B, dtype=jnp.int32) % MODEL.num_classes,
         "mask": jnp.ones((B,), jnp.float32)}
KEY = jax.random.key(2)


@functools.lru_cache(maxsize=None)
def _compiled(plan):
  return jax.jit(functools.partial(sv.untrusted_view, MODEL, plan))


def _view(plan, key=KEY):
  return jax.tree_util.tree_map(np.asarray, _compiled(plan)(PARAMS, STATS, BATCH, key))


def _channel_split_check(full, residual, rank):
  """``full - residual`` has channel rank ``rank`` and ``residual`` has no part in it."""
  for x, r in zip(full, residual):
    low = (x - r).reshape(-1, x.shape[-1])
    r2 = r.reshape(-1, x.shape[-1])
    _, s, vt = np.linalg.svd(low, full_matrices=False)
    assert s[rank:].max(initial=0.0) <= 1e-4 * s[0]
    assert np.linalg.norm(r2 @ vt[:rank].T) <= 1e-4 * np.linalg.norm(x)
    assert np.linalg.norm(r2) > 1e-3 * np.linalg.norm(x)  # something does leave


def test_dense_view_is_everything_the_gpu_only_run_sees():
  view = _view(DENSE)
  assert set(view) == {sv.ACTIVATION, sv.OUTPUT_GRADIENT, sv.WEIGHT_GRADIENT}
  np.testing.assert_array_equal(view[sv.ACTIVATION]["s0"], BATCH["image"])  # the raw image
  assert view[sv.ACTIVATION]["s1"].shape == (B, 4, 4, 4)
  assert {n: a.shape for n, a in view[sv.OUTPUT_GRADIENT].items()} == {
      "conv0": (B, 8, 8, 4), "conv1": (B, 4, 4, 4)}
  paths = ["/".join(str(p.key) for p in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(PARAMS)[0]]
  assert sorted(view[sv.WEIGHT_GRADIENT]) == sorted(paths)
  assert view[sv.WEIGHT_GRADIENT]["convs/conv1/kernel"].shape == (3, 3, 4, 4)


@functools.lru_cache(maxsize=None)
def _per_example_split():
  """Per-example views of BATCH under SPLIT: example i alone, key fold_in(KEY, i)."""
  keys = jax.vmap(lambda i: jax.random.fold_in(KEY, i))(jnp.arange(B))
  fn = sv.per_example_view_fn(MODEL, SPLIT)
  return jax.tree_util.tree_map(np.asarray,
                                fn(PARAMS, STATS, BATCH["image"], BATCH["label"], keys))


def test_per_example_split_views_decompose_the_dense_view():
  """Per example, noise off: R + X_L = X and dY_R + dY_L = dY with private parts of
  rank r, and the weight gradients (one per example) sum to the dense batch aggregate."""
  dense, per = _view(DENSE), _per_example_split()
  assert set(per) == {sv.ACTIVATION, sv.OUTPUT_GRADIENT_RESIDUAL, sv.WEIGHT_GRADIENT}
  assert set(per[sv.ACTIVATION]) == {"s0", "s1"}
  for site, x in dense[sv.ACTIVATION].items():
    assert per[sv.ACTIVATION][site].shape == x.shape
    _channel_split_check(x, per[sv.ACTIVATION][site], RANK)
  assert set(per[sv.OUTPUT_GRADIENT_RESIDUAL]) == {"conv0", "conv1"}
  # Both plans divide the loss by the expected batch size B, so one example's
  # dY is the same alone or in the batch.
  for conv, dy in dense[sv.OUTPUT_GRADIENT].items():
    _channel_split_check(dy, per[sv.OUTPUT_GRADIENT_RESIDUAL][conv], RANK)
  for path, g in dense[sv.WEIGHT_GRADIENT].items():
    assert per[sv.WEIGHT_GRADIENT][path].shape == (B, *g.shape)
    np.testing.assert_allclose(per[sv.WEIGHT_GRADIENT][path].sum(0), g, rtol=2e-3,
                               atol=2e-4 * np.abs(g).max() + 1e-9, err_msg=path)


def test_view_classes_are_the_ledger_classes_of_the_plan():
  declared = {c for c in ledger.expected_classes("enclave", train=True, batch_norm=False,
                                                 gradient_protection="decompose")
              if ledger.LEDGER[c].direction == ledger.TO_UNTRUSTED}
  # Every declared per-example tensor is in the view; only the scalar aggregates are not.
  for view in (_per_example_split(), _view(DP_RANK3)):
    assert {sv.VIEW_LEDGER[c] for c in view} | {"loss", "metrics"} == declared
  # Without gradient protection the full dY would leave, under its own class.
  unprotected = _plan(gradient_protection="none")
  assert sv.gradient_class(unprotected, "s1") == sv.OUTPUT_GRADIENT
  assert "output_gradient" in ledger.expected_classes("enclave", train=True, batch_norm=False,
                                                      gradient_protection="none")
  assert sv.gradient_class(SPLIT, "s1") == sv.OUTPUT_GRADIENT_RESIDUAL
  assert sv.gradient_class(DENSE, "s0") == sv.OUTPUT_GRADIENT


def test_dp_view_shows_the_clipped_and_noised_releases_and_nothing_of_trusted_sites():
  plan = DP_RANK3
  assert [plan.sites[s].mode for s in ("s0", "s1")] == ["trusted", "per_sample"]
  assert sv.exposed_convs(MODEL, plan) == ("conv1",) and sv.gradient_class(plan, "s0") == ""
  view = _view(plan)
  assert set(view[sv.ACTIVATION]) == {"s1"}
  assert set(view[sv.OUTPUT_GRADIENT_RESIDUAL]) == {"conv1"}
  # E||clip(R) + N(0, (sigma c)^2 I_d)||^2 = ||clip(R)||^2 + (sigma c)^2 d with
  # ||clip(R)|| <= c; the mean over B samples of the noise part has relative sd
  # sqrt(2 / (B d)) = 0.1 here (d = 64), so 0.4 is 4 sd from the right scale and
  # far from the wrong ones (no noise: <= c^2 / (sigma^2 c^2 d) = 1/256 of it).
  releases = [(view[sv.ACTIVATION]["s1"], CLIP),
              (view[sv.OUTPUT_GRADIENT_RESIDUAL]["conv1"], GRAD_CLIP)]
  for r, c in releases:
    d = r[0].size
    mean_sq = np.mean(np.sum(r.reshape(B, -1) ** 2, axis=1))
    assert mean_sq == pytest.approx((SIGMA * c) ** 2 * d + 0.5 * c ** 2, rel=0.4)
  again, other = _view(plan), _view(plan, jax.random.key(3))
  np.testing.assert_array_equal(again[sv.ACTIVATION]["s1"], view[sv.ACTIVATION]["s1"])
  assert not np.allclose(other[sv.ACTIVATION]["s1"], view[sv.ACTIVATION]["s1"])
  assert not np.allclose(other[sv.OUTPUT_GRADIENT_RESIDUAL]["conv1"],
                         view[sv.OUTPUT_GRADIENT_RESIDUAL]["conv1"])


def test_a_key_is_required():
  with pytest.raises(ValueError, match="key is required"):
    sv.untrusted_view(MODEL, SPLIT, PARAMS, STATS, BATCH, None)

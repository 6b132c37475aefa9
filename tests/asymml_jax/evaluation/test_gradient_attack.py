"""Tests of asymml_jax.evaluation.gradient_attack (DESIGN section 7, gradient inversion).

A three-stage VGG-style model on 16x16 grayscale digits (two convs of 8 and
16 channels, GroupNorm, ReLU, max pooling, a linear head;
``tests.helpers.tiny_model``) keeps every compilation to a second or two; the
real experiment runs VGG11 on 32x32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asymml_jax import backends
from asymml_jax import data as data_lib
from asymml_jax.evaluation import gradient_attack as ga
from asymml_jax.evaluation import inversion
from asymml_jax.privacy.config import PrivacyConfig
from tests.helpers.tiny_model import tiny_staged_model

SIDE = 16
RANK = 2


@pytest.fixture(scope="module")
def setup():
  """Model, weights and four 16x16 held-out digits (2x2 block means of MNIST-5k)."""
  ds = data_lib.load_dataset("mnist5k")
  # s0 (16x16x1) -> conv0 (8) -> GN/ReLU/pool -> s1 (8x8x8) -> conv1 (16) -> head.
  model = tiny_staged_model(input_shape=(SIDE, SIDE, 1), channels=(8, 16), num_classes=10)
  variables = model.init(jax.random.key(0))
  images = np.asarray(ds.test_images[:4], np.float32)
  images = images.reshape(4, SIDE, 2, SIDE, 2, 1).mean(axis=(2, 4))
  low, high = float(ds.train_images.min()), float(ds.train_images.max())
  return {"model": model, "variables": variables, "images": images,
          "labels": np.asarray(ds.test_labels[:4], np.int32), "low": low, "high": high,
          "attacker": np.asarray(ds.train_images[:2000], np.float32).reshape(
              2000, SIDE, 2, SIDE, 2, 1).mean(axis=(2, 4))}


def _plan(setup, exposure, b=1, expected=None):
  return ga.observation_plan(setup["model"], exposure, b, expected_batch_size=expected)


def _observe(setup, plan, b=1, key=1):
  v = setup["variables"]
  fn = jax.jit(functools.partial(ga.observe, setup["model"], plan))  # eager is ~10x slower
  return fn(v["params"], v["batch_stats"], jnp.asarray(setup["images"][:b]),
            jnp.asarray(setup["labels"][:b]), jax.random.key(key))


def _flat(tree):
  """``{'convs/conv0/kernel': array, ...}`` (the observation's keys) of a nested tree."""
  if all(isinstance(k, str) and "/" in k for k in tree):
    return dict(tree)
  return {"/".join(str(p.key) for p in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _rel_err(a, b):
  a, b = _flat(a), _flat(b)
  assert set(a) == set(b)
  num = sum(float(jnp.sum((a[k] - b[k]) ** 2)) for k in b)
  return (num / sum(float(jnp.sum(b[k] ** 2)) for k in b)) ** 0.5


def _dp_exposure():
  return inversion.Exposure(
      name="dp", kind="asymml",
      decomposition=inversion.Exposure.fixed_rank(RANK).decomposition,
      privacy=PrivacyConfig(enabled=True, clip=0.01, grad_clip=1e-5, noise_multiplier=1.5))


# ----------------------------------------------------------------------------
# What crosses.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def observed(setup):
  """Observations of one 2-image step: dense and AsymML rank 2 (no noise)."""
  plans = {"dense": _plan(setup, inversion.Exposure.dense(), 2),
           "asymml": _plan(setup, inversion.Exposure.fixed_rank(RANK), 2)}
  return plans, {k: _observe(setup, p, 2) for k, p in plans.items()}


def test_asymml_weight_gradient_equals_dense_without_noise(observed):
  # The untrusted side's corr(R, dY_R) plus the enclave's aggregate is the
  # whole weight gradient: with noise off, the dense model's (DESIGN section 1).
  _, obs = observed
  assert _rel_err(obs["asymml"].weight_gradient, obs["dense"].weight_gradient) < 1e-4


def test_observed_gradient_is_what_the_backends_hand_the_optimizer(setup, observed):
  plans, obs = observed
  v = setup["variables"]
  batch = {"image": jnp.asarray(setup["images"][:2]), "label": jnp.asarray(setup["labels"][:2]),
           "mask": jnp.ones((2,), jnp.float32)}
  key = jax.random.key(1)
  # The local backend runs the trusted stages behind host callbacks, as the
  # enclave does: the enclave's share arrives as the cotangent of params_k (the
  # ledger's trusted_weight_gradient) and JAX adds the accelerator's
  # corr(R, dY_R); the optimizer gets the sum, which is what observe() reports.
  backend = backends.LocalBackend(setup["model"], plans["asymml"], key)
  _, g, _, _ = backend.grads(v["params"], v["batch_stats"], batch, 0)
  assert _rel_err(obs["asymml"].weight_gradient, g) < 1e-5


def test_observation_holds_each_released_tensor_class(setup, observed):
  plans, obs = observed
  images = setup["images"][:2]
  # Dense: every activation leaves, the raw image included; every full dY.
  assert set(obs["dense"].residuals) == {"s0", "s1"}
  np.testing.assert_array_equal(np.asarray(obs["dense"].residuals["s0"]), images)
  assert set(obs["dense"].output_gradients) == {"conv0", "conv1"}
  # AsymML: the grayscale input stays (conv0 fully trusted, r >= C); at s1 only
  # the residual leaves: X - R is the rank-2 principal part of each sample.
  assert plans["asymml"].sites["s0"].mode == "trusted"
  assert set(obs["asymml"].residuals) == {"s1"}
  assert set(obs["asymml"].output_gradients) == {"conv1"}
  x_l = np.asarray(obs["dense"].residuals["s1"] - obs["asymml"].residuals["s1"])
  for x in x_l:
    s = np.linalg.svd(x.reshape(-1, x.shape[-1]), compute_uv=False)
    assert s[RANK] < 1e-4 * s[0]
  # dY_R: the output gradient minus its top-2 output channels.
  dy_l = np.asarray(obs["dense"].output_gradients["conv1"]
                    - obs["asymml"].output_gradients["conv1"])
  for d in dy_l:
    s = np.linalg.svd(d.reshape(-1, d.shape[-1]), compute_uv=False)
    assert s[RANK] < 1e-4 * s[0]


def test_observe_needs_a_key(setup):
  plan = _plan(setup, inversion.Exposure.dense())
  v = setup["variables"]
  with pytest.raises(ValueError, match="key"):
    ga.observe(setup["model"], plan, v["params"], v["batch_stats"],
               jnp.asarray(setup["images"][:1]), jnp.asarray(setup["labels"][:1]), None)


def test_surrogate_plan_turns_only_the_noise_off(setup):
  dp = _plan(setup, _dp_exposure())
  s = ga.surrogate_plan(dp)
  assert s.privacy.enabled and s.privacy.noise_multiplier == 0.0
  assert s.privacy.clip == dp.privacy.clip and s.privacy.grad_clip == dp.privacy.grad_clip
  assert s.sites == dp.sites
  plain = _plan(setup, inversion.Exposure.fixed_rank(1))
  assert ga.surrogate_plan(plain) is plain


# ----------------------------------------------------------------------------
# Distances, labels, alignment.
# ----------------------------------------------------------------------------


def test_distances():
  a = {"w": jnp.asarray([1.0, 2.0]), "b": jnp.asarray([[3.0]])}
  neg = jax.tree_util.tree_map(lambda x: -x, a)
  big = jax.tree_util.tree_map(lambda x: 5 * x, a)
  assert abs(float(ga.gradient_distance(a, a))) < 1e-6
  assert abs(float(ga.gradient_distance(a, big))) < 1e-6   # a cosine: scale-free
  assert abs(float(ga.gradient_distance(a, neg)) - 2.0) < 1e-6
  x = jnp.ones((1, 4, 4, 1))
  obs = ga.Observation(weight_gradient=a, residuals={"s1": x},
                       output_gradients={"c1": 2 * x})
  assert float(ga.residual_distance(obs, obs)) == 0.0
  scaled = obs._replace(residuals={"s1": 3 * x})
  # (3 - 1)^2 / (9 + 1) = 0.4 for the residual, 0 for dY_R; weights 1 and 0.5.
  assert abs(float(ga.residual_distance(scaled, obs, 0.5)) - 0.4 / 1.5) < 1e-6
  assert abs(float(ga.residual_distance(scaled, obs, 0.0)) - 0.4) < 1e-6
  assert float(ga.total_variation(x)) == 0.0
  step = jnp.zeros((1, 4, 4, 1)).at[:, :, 2:].set(1.0)  # one vertical edge
  assert abs(float(ga.total_variation(step)) - 4 / 12) < 1e-6


def test_labels_are_recovered_from_the_head_bias_gradient(setup, observed):
  _, obs = observed
  labels = np.sort(setup["labels"][:2])
  assert len(set(labels.tolist())) == 2   # two distinct digits (2 and 1)
  for name in ("dense", "asymml"):  # the head's gradient is in the aggregate
    got = ga.recover_labels(setup["model"], obs[name].weight_gradient, 2)
    np.testing.assert_array_equal(got, labels)
  assert ga.label_recovery_accuracy(np.array([1, 1, 2]), np.array([1, 2, 2])) == pytest.approx(
      2 / 3)
  with pytest.raises(ValueError, match="batch_size"):
    ga.recover_labels(setup["model"], obs["dense"].weight_gradient, 11)


def test_align_batch_undoes_a_permutation(setup):
  x = setup["images"]
  np.testing.assert_array_equal(ga.align_batch(x, x[[2, 0, 3, 1]]), x)


# ----------------------------------------------------------------------------
# Settings.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 0}, "steps"), ({"steps": 2.0}, "steps"), ({"learning_rate": 0.0}, "learning_rate"),
    ({"tv_weight": -1.0}, "tv_weight"), ({"residual_weight": float("nan")}, "residual_weight"),
    ({"output_gradient_weight": -0.1}, "output_gradient_weight"),
    ({"init_scale": 0}, "init_scale"), ({"signed": 1}, "signed"), ({"labels": "guess"}, "labels"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ga.GradientAttackConfig(**kwargs)


def test_channel_weights_and_schedule():
  assert ga.channel_weights("weight_gradient") == (1.0, 0.0)
  assert ga.channel_weights("residuals") == (0.0, 1.0)
  assert ga.channel_weights("both", 0.5) == (1.0, 0.5)
  with pytest.raises(ValueError, match="channel"):
    ga.channel_weights("loss")
  sched = ga.learning_rate_schedule(ga.GradientAttackConfig(steps=80, learning_rate=1.0))
  assert [float(sched(i)) for i in (0, 29, 30, 50, 70)] == pytest.approx(
      [1.0, 1.0, 0.1, 0.01, 0.001])


# ----------------------------------------------------------------------------
# The attack.
# ----------------------------------------------------------------------------


def test_matching_the_dense_release_recovers_the_image(setup):
  # Dense exposure (what a GPU-only accelerator receives), two one-image steps:
  # matching the released activations must beat every no-information floor
  # clearly; every channel is reported.
  low, high = setup["low"], setup["high"]
  config = ga.GradientAttackConfig(steps=60, learning_rate=0.1)
  args = (setup["model"], setup["variables"], inversion.Exposure.dense(), setup["images"][:2],
          setup["labels"][:2])
  kwargs = dict(batch_size=1, channels=("residuals", "weight_gradient"), config=config,
                low=low, high=high)
  results = ga.run_gradient_attack(*args, key=jax.random.key(3), **kwargs)
  assert [r.channel for r in results] == ["residuals", "weight_gradient"]
  floors = inversion.prior_baselines(setup["attacker"], setup["images"][:2], low=low, high=high)
  floor = max(f["ssim"] for f in floors.values())
  res = results[0]
  assert res.metrics["ssim"] > floor + 0.3, (res.metrics, floor)
  assert res.final_distance[0] < res.history[0, 0]   # the distance went down
  for r in results:
    assert r.recons.shape == (2, SIDE, SIDE, 1) and r.metrics["n"] == 2
    assert r.label_accuracy == 1.0                    # iDLG on one image
    row = r.to_dict()
    assert set(row["final_distance"]) == {"total", "weight_gradient", "residuals", "tv"}
    assert len(row["distance_curve"]) == 4            # steps 0, 25, 50 and the last
    # At the truth both distances vanish (only the TV prior remains).
    assert r.distance_at_truth[1] < 1e-4 and r.distance_at_truth[2] < 1e-4
  with pytest.raises(ValueError, match="key"):
    ga.run_gradient_attack(*args, key=None, **kwargs)
  with pytest.raises(ValueError, match="channels"):
    ga.run_gradient_attack(*args, key=jax.random.key(0),
                           **dict(kwargs, channels=("weight_gradient", "weight_gradient")))
  with pytest.raises(ValueError, match="batch"):
    ga.run_gradient_attack(*args, key=jax.random.key(0), **dict(kwargs, batch_size=3))


@pytest.mark.slow
def test_dp_release_and_the_attackers_surrogate(setup):
  # The victim's DP step: releases are clip(R) + N(0, (sigma c)^2), whose norm is
  # the noise's; the noise also enters the weight gradient the untrusted side holds.
  plan = _plan(setup, _dp_exposure(), 1, expected=64.0)
  m = ga.Matcher(setup["model"], plan, setup["variables"], ga.GradientAttackConfig(steps=2),
                 low=setup["low"], high=setup["high"])
  x, y = setup["images"][:1], setup["labels"][:1]
  obs = m.observe(x, y, jax.random.key(1))
  r = np.asarray(obs.residuals["s1"]).reshape(-1)
  assert np.linalg.norm(r) == pytest.approx(1.5 * 0.01 * np.sqrt(r.size), rel=0.1)
  assert set(obs.output_gradients) == {"conv1"}
  # The attacker's surrogate (noise off, clipping on; U differentiable in the
  # image but constant for the step's own gradient) at the truth matches the
  # noisy weight gradient far better than at a random image.
  rand = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
  d_truth = m.distances(x, y, obs, (1.0, 0.0), jax.random.key(2))
  d_rand = m.distances(rand, y, obs, (1.0, 0.0), jax.random.key(2))
  assert d_truth[1] < 0.5 * d_rand[1], (d_truth, d_rand)
  a = m.run(obs, y, (1.0, 0.0), jax.random.key(2), jax.random.key(3))
  b = m.run(obs, y, (1.0, 0.0), jax.random.key(2), jax.random.key(3))
  c = m.run(obs, y, (1.0, 0.0), jax.random.key(2), jax.random.key(4))
  np.testing.assert_array_equal(a[0], b[0])   # one key, one result
  assert not np.array_equal(a[0], c[0])
  assert np.all(np.isfinite(a[0])) and np.all(np.isfinite(a[1]))
  with pytest.raises(ValueError, match="key"):
    m.run(obs, y, (1.0, 0.0), None, jax.random.key(3))


def test_differentiable_subspaces_compute_the_same_decomposition():
  # Inside differentiable_subspaces the decomposition computes the same U
  # (same start block, same iteration) ...
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 6)), jnp.float32)
  key = jax.random.key(0)
  ref = ga.dec.decompose(x, key, 2, tau=0.0, num_iters=2)
  with ga.differentiable_subspaces():
    got = ga.dec.decompose(x, key, 2, tau=0.0, num_iters=2)
  assert ga.dec.decompose is not ga._differentiable_decompose  # restored
  np.testing.assert_allclose(np.asarray(got.residual), np.asarray(ref.residual), atol=1e-5)


@pytest.mark.slow
def test_outer_derivative_through_subspaces_matches_finite_differences():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 6)), jnp.float32)
  key = jax.random.key(0)
  # ... U stays a constant for the step's own (inner) gradient, as the
  # mechanism's stop-gradient makes it, while the attacker's outer derivative
  # of that gradient sees U move with x.  Inner: d/ds sum(P(s x) c) with U
  # constant is g(x) = sum(P(x) c), P = X U(x); outer: dg/dx, checked against
  # finite differences of g (smooth here: QR and a small eigh).
  c = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4, 4, 2)), jnp.float32)

  @functools.partial(jax.jit, static_argnums=1)
  def inner_gradient(x, patched):
    def loss(s):
      with ga.differentiable_subspaces(patched):
        return jnp.sum(ga.dec.decompose(s * x, key, 2, tau=0.0, num_iters=2).p * c)
    return jax.grad(loss)(1.0)

  g_plain, g_patched = inner_gradient(x, False), inner_gradient(x, True)
  assert float(g_plain) == pytest.approx(float(g_patched), rel=1e-5)
  direction = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape), jnp.float32)
  eps = 1e-2
  fd = float(inner_gradient(x + eps * direction, False)
             - inner_gradient(x - eps * direction, False)) / (2 * eps)
  outer = jax.jit(jax.grad(inner_gradient), static_argnums=1)
  patched = float(jnp.vdot(outer(x, True), direction))
  plain = float(jnp.vdot(outer(x, False), direction))
  assert patched == pytest.approx(fd, rel=0.05, abs=1e-3)
  assert abs(plain - fd) > 0.1 * abs(fd)   # U held constant: the wrong derivative


@pytest.mark.slow
def test_weight_gradient_attack_beats_the_prior_floor(setup):
  # The dense weight gradient alone (Geiping et al.), one digit per step, on a
  # three-conv network briefly trained on the (attacker-side) training digits:
  # the mean SSIM over four victims must beat the no-information floor.
  # (Measured: 0.27 against a floor of 0.16; on the two-conv test network,
  # with fewer parameters than pixels, gradient matching does not.)
  low, high = setup["low"], setup["high"]
  model = tiny_staged_model(input_shape=(SIDE, SIDE, 1), channels=(16, 32, 64),
                            num_classes=10)
  ds = data_lib.load_dataset("mnist5k")
  variables = inversion.public_weights(model, jax.random.key(0), train_steps=50,
                                       images=setup["attacker"][:2000],
                                       labels=ds.train_labels[:2000], batch_size=64)
  (res,) = ga.run_gradient_attack(
      model, variables, inversion.Exposure.dense(), setup["images"], setup["labels"],
      batch_size=1, channels=("weight_gradient",), config=ga.GradientAttackConfig(steps=400),
      key=jax.random.key(3), low=low, high=high)
  floors = inversion.prior_baselines(setup["attacker"], setup["images"], low=low, high=high)
  assert res.metrics["ssim"] > max(f["ssim"] for f in floors.values()) + 0.05

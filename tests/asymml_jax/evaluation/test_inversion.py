"""Tests of asymml_jax.evaluation.inversion (DESIGN section 7, model inversion)."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asymml_jax import data as data_lib
from asymml_jax import decomposition as dec
from asymml_jax.evaluation import inversion as inv
from asymml_jax.models import get_model
from asymml_jax.privacy.config import PrivacyConfig

B = 4


@pytest.fixture(scope="module")
def mnist():
  return data_lib.load_dataset("mnist5k")


@pytest.fixture(scope="module")
def tiny():
  """VGG11 at width 1/8 on 32x32 grayscale: site s1 is (16, 16, 8)."""
  model = get_model("vgg11", num_classes=10, input_shape=(32, 32, 1), width=0.125,
                    norm="group")
  return model, model.init(jax.random.key(0))


def _fake_dataset(train, test):
  return data_lib.Dataset(name="fake", train_images=train, train_labels=np.zeros(len(train), np.int32),
                          test_images=test, test_labels=np.zeros(len(test), np.int32),
                          num_classes=2)


# ----------------------------------------------------------------------------
# The split.
# ----------------------------------------------------------------------------


def test_mnist5k_attacker_and_victim_are_disjoint(mnist):
  split = inv.attack_split(mnist, num_attacker=None, num_victim=None,
                           rng=np.random.default_rng(0))
  inv.check_disjoint(mnist, split)
  train_rows, test_rows = data_lib.mnist5k_split_indices()
  # By source row: attacker rows come from the train split, victim rows from the test split.
  assert len(split.victim) == 500 and len(split.attacker) == 4500
  assert set(split.attacker_rows.tolist()) <= set(train_rows.tolist())
  assert set(split.victim_rows.tolist()) == set(test_rows.tolist())
  assert not set(split.attacker_rows.tolist()) & set(split.victim_rows.tolist())
  # By content: no attacker image array equals a victim image array (and the
  # raw 28x28 csv digits agree: normalisation is one affine map for both splits).
  raw, _ = data_lib._mnist5k_raw()  # pylint: disable=protected-access
  raw_attacker = {raw[r].tobytes() for r in split.attacker_rows}
  assert not any(raw[r].tobytes() in raw_attacker for r in split.victim_rows)
  victim = {mnist.test_images[i].tobytes() for i in split.victim}
  assert not any(mnist.train_images[i].tobytes() in victim for i in split.attacker)


def test_split_subset_is_reproducible_and_needs_a_generator(mnist):
  a = inv.attack_split(mnist, num_attacker=100, num_victim=50, rng=np.random.default_rng(3))
  b = inv.attack_split(mnist, num_attacker=100, num_victim=50, rng=np.random.default_rng(3))
  c = inv.attack_split(mnist, num_attacker=100, num_victim=50, rng=np.random.default_rng(4))
  np.testing.assert_array_equal(a.attacker, b.attacker)
  assert not np.array_equal(a.attacker, c.attacker)
  assert len(a.attacker) == 100 and len(np.unique(a.attacker)) == 100
  np.testing.assert_array_equal(a.victim, np.arange(50))
  with pytest.raises(ValueError, match="Generator"):
    inv.attack_split(mnist, num_attacker=10, num_victim=10, rng=None)
  with pytest.raises(ValueError, match="num_attacker"):
    inv.attack_split(mnist, num_attacker=4501, num_victim=10, rng=np.random.default_rng(0))
  with pytest.raises(ValueError, match="num_victim"):
    inv.attack_split(mnist, num_attacker=10, num_victim=501, rng=np.random.default_rng(0))


def test_duplicates_of_victim_images_never_reach_the_attacker():
  g = np.random.default_rng(0)
  train = g.standard_normal((20, 4, 4, 1)).astype(np.float32)
  test = g.standard_normal((5, 4, 4, 1)).astype(np.float32)
  train[7] = test[2]  # the same digit in both splits
  ds = _fake_dataset(train, test)
  split = inv.attack_split(ds, num_attacker=None, num_victim=None, rng=g)
  assert 7 not in split.attacker.tolist() and len(split.attacker) == 19
  assert split.attacker_rows is None  # no source ids for this data set
  inv.check_disjoint(ds, split)
  forged = dataclasses.replace(split, attacker=np.array([0, 7]))
  with pytest.raises(ValueError, match=r"train\[7\] is identical to victim image test\[2\]"):
    inv.check_disjoint(ds, forged)
  forged = dataclasses.replace(split, attacker_rows=np.array([1, 2]),
                               victim_rows=np.array([2, 3]))
  with pytest.raises(ValueError, match="share source rows"):
    inv.check_disjoint(ds, forged)
  with pytest.raises(ValueError, match="repeat"):
    inv.check_disjoint(ds, dataclasses.replace(split, attacker=np.array([0, 0])))


# ----------------------------------------------------------------------------
# Exposures.
# ----------------------------------------------------------------------------


def _images(n=B, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, 32, 32, 1), jnp.float32)


def test_dense_exposes_the_full_activation_and_split_its_residual(tiny):
  model, variables = tiny
  params, stats = variables["params"], variables["batch_stats"]
  images, key = _images(), jax.random.key(1)
  site = inv.attacked_site(model)
  assert site == "s1" and model.site_shapes[site] == (16, 16, 8)

  dense_plan = inv.exposure_plan(model, inv.Exposure.dense(), B)
  x, _ = inv.stage_release(model, dense_plan, params, stats, images, key)
  assert x.shape == (B, 16, 16, 8)
  assert float(jnp.min(x)) >= 0.0  # after ReLU and max pooling: the activation itself

  r = 2
  split_plan = inv.exposure_plan(model, inv.Exposure.fixed_rank(r), B)
  assert split_plan.sites["s0"].mode == "trusted"  # the grayscale input never leaves
  assert split_plan.sites[site].mode == "per_sample" and split_plan.sites[site].r_max == r
  res, priv = inv.stage_release(model, split_plan, params, stats, images, key)
  u, p = priv["u"][site], priv["p"][site]
  assert res.shape == x.shape and u.shape == (B, 8, r)
  # The residual has no component along U ...
  proj = dec.project(res, u)
  assert float(jnp.max(jnp.abs(proj))) <= 1e-4 * float(jnp.max(jnp.abs(res)))
  # ... it is not the activation, and X_L + R is exactly the dense exposure.
  assert float(jnp.linalg.norm(res - x)) > 0.1 * float(jnp.linalg.norm(x))
  np.testing.assert_allclose(dec.reconstruct(p, u) + res, x, rtol=1e-5, atol=1e-5)
  # Keeping more channels leaves less energy outside.
  res4, _ = inv.stage_release(model, inv.exposure_plan(model, inv.Exposure.fixed_rank(4), B),
                              params, stats, images, key)
  assert float(jnp.linalg.norm(res4)) < float(jnp.linalg.norm(res)) < float(jnp.linalg.norm(x))


def test_dp_exposure_is_clipped_and_noised_with_fresh_keys(tiny):
  model, variables = tiny
  params, stats = variables["params"], variables["batch_stats"]
  images = _images()
  clip_only = inv.Exposure(name="clip", kind="asymml",
                           decomposition=inv.Exposure.fixed_rank(1).decomposition,
                           privacy=PrivacyConfig(enabled=True, clip=0.01, noise_multiplier=0.0))
  plan = inv.exposure_plan(model, clip_only, B)
  released, _ = inv.stage_release(model, plan, params, stats, images, jax.random.key(1))
  norms = jnp.sqrt(jnp.sum(released ** 2, axis=(1, 2, 3)))
  assert float(jnp.max(norms)) <= 0.01 * (1 + 1e-5)
  sigma = 2.0
  noisy = dataclasses.replace(clip_only, privacy=dataclasses.replace(
      clip_only.privacy, noise_multiplier=sigma))
  plan = inv.exposure_plan(model, noisy, B)
  a = inv.extract_exposures(model, plan, params, stats, np.asarray(_images(6)),
                            jax.random.key(1))
  b = inv.extract_exposures(model, plan, params, stats, np.asarray(_images(6)),
                            jax.random.key(2))
  assert a.shape == (6, 16, 16, 8)  # 6 rows in batches of 4: the padding is dropped
  # Noise std sigma * clip per element (the clipped signal has norm <= 0.01 over 2048 elements).
  assert abs(float(np.std(a)) / (sigma * 0.01) - 1) < 0.05
  assert not np.allclose(a, b)  # independent key streams: independent noise


def test_extract_exposures_matches_one_batch_and_pads(tiny):
  model, variables = tiny
  params, stats = variables["params"], variables["batch_stats"]
  plan = inv.exposure_plan(model, inv.Exposure.dense(), B)
  images = np.asarray(_images(6))
  got = inv.extract_exposures(model, plan, params, stats, images, jax.random.key(0))
  first, _ = inv.stage_release(model, plan, params, stats, images[:B], jax.random.key(0))
  np.testing.assert_allclose(got[:B], first, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="key is required"):
    inv.extract_exposures(model, plan, params, stats, images, None)


def test_exposure_validation(tiny):
  model, _ = tiny
  with pytest.raises(ValueError, match="privacy cannot be enabled"):
    inv.Exposure(name="d", kind="dense", privacy=PrivacyConfig(enabled=True, clip=1.0,
                                                               noise_multiplier=1.0))
  with pytest.raises(ValueError, match="fixed noise_multiplier"):
    inv.Exposure(name="x", kind="asymml", privacy=PrivacyConfig(enabled=True, clip=1.0,
                                                                target_epsilon=8.0))
  with pytest.raises(ValueError, match="kind"):
    inv.Exposure(name="x", kind="gpu")
  with pytest.raises(ValueError, match="rank"):
    inv.Exposure.fixed_rank(0)
  # Keeping all 8 channels leaves nothing to split: refused, not silently "safe".
  with pytest.raises(ValueError, match="runs fully trusted"):
    inv.exposure_plan(model, inv.Exposure.fixed_rank(8), B)
  with pytest.raises(ValueError, match="stage"):
    inv.attacked_site(model, 0)


def test_public_weights_init_and_a_few_dense_steps(mnist, tiny):
  model, _ = tiny
  key = jax.random.key(0)
  init = inv.public_weights(model, key)
  again = inv.public_weights(model, key)
  chex.assert_trees_all_equal(init, again)  # same key, same weights
  trained = inv.public_weights(model, key, train_steps=2, images=mnist.train_images[:256],
                               labels=mnist.train_labels[:256], batch_size=16)
  k0 = init["params"]["convs"]["conv0"]["kernel"]
  assert not np.allclose(k0, trained["params"]["convs"]["conv0"]["kernel"])
  with pytest.raises(ValueError, match="training images"):
    inv.public_weights(model, key, train_steps=1)
  with pytest.raises(ValueError, match="key is required"):
    inv.public_weights(model, None)


# ----------------------------------------------------------------------------
# Decoder and metrics.
# ----------------------------------------------------------------------------


def _linear_pairs(n=128, seed=0):
  """Images that are a fixed local function of (4, 4, 3) inputs: a channel mix, upsampled 2x."""
  g = np.random.default_rng(seed)
  x = g.standard_normal((n, 4, 4, 3)).astype(np.float32)
  mix = g.standard_normal((3, 1)).astype(np.float32)
  y = np.repeat(np.repeat(x @ mix, 2, axis=1), 2, axis=2)
  return x, y / y.std()


def test_decoder_training_reduces_the_loss():
  x, y = _linear_pairs()
  cfg = inv.DecoderConfig(features=8, epochs=10, batch_size=16, learning_rate=1e-2)
  decoder, params, losses = inv.train_decoder(x, y, config=cfg, key=jax.random.key(0))
  assert len(losses) == 10 and all(np.isfinite(losses))
  assert losses[-1] < 0.3 * losses[0], losses
  out = inv.reconstruct(decoder, params, x[:10], batch_size=4)  # 3 padded batches
  assert out.shape == (10, 8, 8, 1)
  np.testing.assert_allclose(out, decoder.apply(params, x[:10]), rtol=1e-4, atol=1e-5)
  # Same key, same run; the key is required.
  _, _, again = inv.train_decoder(x, y, config=cfg, key=jax.random.key(0))
  assert again == losses
  with pytest.raises(ValueError, match="key is required"):
    inv.train_decoder(x, y, config=cfg, key=None)


@pytest.mark.parametrize("in_hw,out_hw", [(16, 32), (8, 32), (5, 12), (32, 32)])
def test_decoder_output_shape(in_hw, out_hw):
  decoder = inv.Decoder(out_shape=(out_hw, out_hw, 3), features=4)
  x = jnp.zeros((2, in_hw, in_hw, 5))
  params = decoder.init(jax.random.key(0), x)
  assert decoder.apply(params, x).shape == (2, out_hw, out_hw, 3)


def test_decoder_config_validation():
  with pytest.raises(ValueError, match="epochs"):
    inv.DecoderConfig(epochs=0)
  with pytest.raises(ValueError, match="learning_rate"):
    inv.DecoderConfig(learning_rate=0.0)
  with pytest.raises(TypeError):
    inv.DecoderConfig(32)  # keyword-only  # pylint: disable=too-many-function-args
  with pytest.raises(dataclasses.FrozenInstanceError):
    inv.DecoderConfig().epochs = 3  # frozen


def test_standardiser_uses_the_fitting_data_only():
  g = np.random.default_rng(0)
  a = 3.0 + 2.0 * g.standard_normal((500, 4, 4, 2))
  s = inv.Standardiser.fit(a)
  z = s(a)
  np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
  np.testing.assert_allclose(s(np.full((1, 4, 4, 2), 3.0)), 0.0, atol=0.05)


def test_image_metrics_perfect_floor_and_validation(mnist):
  victim = np.asarray(mnist.test_images[:20])
  low, high = float(mnist.train_images.min()), float(mnist.train_images.max())
  perfect = inv.image_metrics(victim, victim, low=low, high=high)
  assert perfect["ssim"] == pytest.approx(1.0) and perfect["psnr"] == 100.0
  floors = inv.prior_baselines(mnist.train_images[:500], victim, low=low, high=high)
  for f in floors.values():
    assert f["ssim"] < 0.4 and f["psnr"] < 15.0
  noisy = victim + 0.3 * np.random.default_rng(0).standard_normal(victim.shape)
  m = inv.image_metrics(victim, noisy, low=low, high=high)
  assert floors["prior_mean"]["ssim"] < m["ssim"] < 1.0
  # PSNR agrees with its definition on the clipped reconstruction.
  clipped = np.clip(noisy, low, high)
  want = np.mean([10 * np.log10((high - low) ** 2 / np.mean((x - y) ** 2))
                  for x, y in zip(victim, clipped)])
  assert m["psnr"] == pytest.approx(want, rel=1e-6)
  with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
    inv.image_metrics(victim[:, :, :, 0], victim[:, :, :, 0], low=low, high=high)
  with pytest.raises(ValueError, match="high > low"):
    inv.image_metrics(victim, victim, low=1.0, high=1.0)


def test_run_inversion_end_to_end_tiny(mnist, tiny):
  model, variables = tiny
  low, high = float(mnist.train_images.min()), float(mnist.train_images.max())
  lines = []
  result = inv.run_inversion(
      model, variables, inv.Exposure.fixed_rank(1), np.asarray(mnist.train_images[:64]),
      np.asarray(mnist.test_images[:16]),
      decoder=inv.DecoderConfig(features=8, epochs=2, batch_size=32), key=jax.random.key(0),
      batch_size=32, low=low, high=high, num_examples=4, log=lines.append)
  assert result.name == "asymml_r1" and result.exposure_shape == (16, 16, 8)
  assert result.examples.shape == (4, 32, 32, 1)
  assert low <= result.examples.min() and result.examples.max() <= high
  assert -1.0 <= result.metrics["ssim"] <= 1.0 and result.metrics["n"] == 16
  assert len(result.losses) == 2 and "asymml_r1: SSIM" in lines[0]
  row = result.to_dict()
  assert {"ssim", "psnr", "ssim_uniform7", "decoder_losses", "seconds"} <= set(row)

"""Tests of asymml_jax.privacy.config (DESIGN sections 7 and 11)."""

from __future__ import annotations

import dataclasses

import pytest

from asymml_jax.privacy.config import PrivacyConfig

N = 4500  # MNIST-5k train split


def _dp(**kw) -> PrivacyConfig:
  kw.setdefault("noise_multiplier", 1.0)
  return PrivacyConfig(enabled=True, **kw)


def test_defaults_are_disabled_and_valid():
  cfg = PrivacyConfig()
  assert not cfg.enabled
  assert cfg.sampling == "auto" and cfg.gradient_protection == "decompose"
  assert cfg.batch_sampling == "shuffle"
  assert PrivacyConfig(enabled=True, noise_multiplier=1.0).batch_sampling == "poisson"
  cfg.validate_for(norm="batch", scope="per_batch", num_examples=N)


def test_valid_dp_config_passes():
  _dp(clip=0.5, delta=1e-5).validate_for(norm="group", scope="per_sample",
                                         num_examples=N)
  _dp(noise_multiplier=0.0, target_epsilon=8.0).validate_for(
      norm="none", scope="per_sample", num_examples=N)


def test_disabled_allows_batchnorm_per_batch_and_any_delta():
  cfg = PrivacyConfig(enabled=False, delta=0.5, sampling="shuffle",
                      gradient_protection="none")
  cfg.validate_for(norm="batch", scope="per_batch", num_examples=N)


def test_frozen():
  cfg = PrivacyConfig()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.enabled = True  # type: ignore[misc]


def test_keyword_only():
  with pytest.raises(TypeError):
    PrivacyConfig(True)  # type: ignore[misc]


@pytest.mark.parametrize("kwargs, words", [
    (dict(norm="batch", scope="per_sample"), ["BatchNorm mixes samples",
                                              "norm='group'"]),
    (dict(norm="layerwise?", scope="per_sample"), ["unknown norm",
                                                   "one sample at a time"]),
    (dict(norm="group", scope="per_batch"), ["per_batch", "depend on the other samples",
                                             "scope='per_sample'"]),
    (dict(norm="group", scope="per_pixel"), ["unknown scope"]),
])
def test_validate_for_refuses_sample_mixing(kwargs, words):
  with pytest.raises(ValueError) as err:
    _dp().validate_for(num_examples=N, **kwargs)
  for w in words:
    assert w in str(err.value)


@pytest.mark.parametrize("delta", [1 / N, 1e-3, 0.5])
def test_validate_for_refuses_delta_at_least_one_over_n(delta):
  with pytest.raises(ValueError, match=r"delta must be < 1/N = 0.000222") as err:
    _dp(delta=delta).validate_for(norm="group", scope="per_sample",
                                  num_examples=N)
  assert "promises nothing" in str(err.value)


def test_validate_for_accepts_delta_just_below_one_over_n():
  _dp(delta=0.99 / N).validate_for(norm="group", scope="per_sample",
                                   num_examples=N)


@pytest.mark.parametrize("num_examples", [0, -3, 2.5, True])
def test_validate_for_refuses_bad_num_examples(num_examples):
  with pytest.raises(ValueError, match="num_examples"):
    _dp().validate_for(norm="group", scope="per_sample",
                       num_examples=num_examples)


def test_validate_for_refuses_shuffle_sampling():
  with pytest.raises(ValueError, match="Poisson-subsampled") as err:
    _dp(sampling="shuffle").validate_for(norm="group", scope="per_sample",
                                         num_examples=N)
  assert "sampling='poisson'" in str(err.value)


def test_validate_for_refuses_clear_gradients():
  with pytest.raises(ValueError, match="in the clear"):
    _dp(gradient_protection="none").validate_for(
        norm="group", scope="per_sample", num_examples=N)


def test_validate_for_refuses_no_noise():
  with pytest.raises(ValueError, match="epsilon = inf"):
    _dp(noise_multiplier=0.0).validate_for(norm="group", scope="per_sample",
                                           num_examples=N)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(enabled=True, clip=0.0), "clip must be > 0 when enabled.*sensitivity"),
    (dict(enabled=True, clip=-1.0), "clip must be > 0 when enabled"),
    (dict(enabled=True, grad_clip=0.0), "grad_clip must be > 0 when enabled"),
    (dict(grad_clip=float("inf")), "grad_clip must be a finite number"),
    (dict(clip=float("nan")), "clip must be a finite number"),
    (dict(noise_multiplier=-0.1), "noise_multiplier must be a finite number >= 0"),
    (dict(noise_multiplier=float("inf")), "noise_multiplier must be"),
    (dict(target_epsilon=0.0), "target_epsilon must be a finite number > 0"),
    (dict(target_epsilon=-1.0), "target_epsilon must be"),
    (dict(target_epsilon=2.0, noise_multiplier=1.0), "not both"),
    (dict(delta=0.0), r"delta must be in \(0, 1\)"),
    (dict(delta=1.0), r"delta must be in \(0, 1\)"),
    (dict(gradient_protection="full"), "gradient_protection must be one of"),
    (dict(sampling="uniform"), "sampling must be one of"),
    (dict(enabled="yes"), "enabled must be a bool"),
])
def test_construction_refuses_out_of_range(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    PrivacyConfig(**kwargs)


def test_disabled_construction_allows_zero_clip():
  assert PrivacyConfig(enabled=False, clip=0.0).clip == 0.0


def test_with_noise_multiplier_fixes_sigma_and_drops_the_target():
  cfg = PrivacyConfig(enabled=True, target_epsilon=8.0)
  fixed = cfg.with_noise_multiplier(1.5)
  assert fixed.noise_multiplier == 1.5 and fixed.target_epsilon is None
  assert cfg.target_epsilon == 8.0  # frozen original untouched

"""DP-SGD baseline: per-example clipping, noise scale, masking, config, accounting, run."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asymml_jax import data as data_lib
from asymml_jax import stages as st
from asymml_jax import train as train_lib
from asymml_jax.baselines import dpsgd
from asymml_jax.models import get_model
from asymml_jax.privacy import accounting

N_TRAIN, N_TEST, EXPECTED = 300, 100, 16
TINY = dict(model="vgg11", width=0.125, norm="group", batch_size=EXPECTED, warmup_steps=1,
            log_every=1, eval_batch_size=N_TEST)


@pytest.fixture(scope="module")
def small_mnist() -> data_lib.Dataset:
  """300 train / 100 test real MNIST digits (32x32x1)."""
  ds = data_lib.load_dataset("mnist5k")
  return data_lib.Dataset(name="mnist300", train_images=ds.train_images[:N_TRAIN],
                          train_labels=ds.train_labels[:N_TRAIN],
                          test_images=ds.test_images[:N_TEST],
                          test_labels=ds.test_labels[:N_TEST], num_classes=ds.num_classes)


def _grad(s, batch, *, clip, sigma, expected, step=0):
  return s["private_grad"](s["params"], s["stats"], batch, s["model_key"], s["noise_key"],
                           jnp.int32(step), dpsgd.step_hyper(clip, sigma, expected))


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


@pytest.fixture(scope="module")
def setup(small_mnist):
  """Tiny model, its weights, a padded Poisson batch and the jitted gradient (compiled once)."""
  model = get_model("vgg11", num_classes=10, input_shape=(32, 32, 1), width=0.125, norm="group")
  init_key, model_key, noise_key = dpsgd.split_keys(0)
  variables = model.init(init_key)
  batch, _ = data_lib.poisson_batch(small_mnist.train_images, small_mnist.train_labels,
                                    EXPECTED, seed=0, step=0)
  count = int(batch["mask"].sum())
  assert 0 < count < len(batch["mask"])  # real rows and padding rows
  s = dict(model=model, plan=dpsgd.dense_plan(model), params=variables["params"],
           stats=variables["batch_stats"], batch=batch, count=count, model_key=model_key,
           noise_key=noise_key, private_grad=dpsgd.make_private_grad_fn(model))
  # Raw per-example gradient g_i: example i alone (one-hot mask), no clipping
  # (C = 1e9), no noise, B = 1.  The same compiled function as every other call.
  eye = np.eye(len(batch["mask"]), dtype=np.float32)
  s["raw"] = [_flat(_grad(s, dict(batch, mask=eye[i]), clip=1e9, sigma=0.0, expected=1.0)[0])
              for i in range(count)]
  return s


def test_per_example_clipping_bounds_every_norm(setup):
  s = setup
  batch, count = s["batch"], s["count"]
  raw_norms = np.array([np.linalg.norm(s["raw"][i]) for i in range(count)])
  assert raw_norms.min() > 0
  clip = float(np.median(raw_norms))  # about half the examples are clipped
  # Each real example alone (one-hot mask, B = 1, no noise): its clipped gradient.
  for i in range(min(count, 6)):
    one = dict(batch, mask=np.eye(len(batch["mask"]), dtype=np.float32)[i])
    g, m = _grad(s, one, clip=clip, sigma=0.0, expected=1.0)
    g = _flat(g)
    assert np.linalg.norm(g) <= clip * (1 + 1e-5)
    scale = min(1.0, clip / raw_norms[i])
    np.testing.assert_allclose(g, s["raw"][i] * scale, rtol=1e-4,
                               atol=1e-6 * np.abs(g).max())
    assert int(m["num_clipped"]) == int(raw_norms[i] > clip)
  # The whole batch: the sum of the clipped per-example gradients, over B.
  g, m = _grad(s, batch, clip=clip, sigma=0.0, expected=EXPECTED)
  want = sum(s["raw"][i] * min(1.0, clip / raw_norms[i]) for i in range(count))
  np.testing.assert_allclose(_flat(g), want / EXPECTED, rtol=1e-4,
                             atol=1e-6 * np.abs(want).max())
  assert int(m["num_clipped"]) == int(np.sum(raw_norms > clip))
  assert int(m["count"]) == count


def test_huge_clip_without_noise_is_the_mean_gradient_times_count_over_expected(setup):
  s = setup
  batch = s["batch"]

  def loss(p):
    return st.inline_loss(s["model"], s["plan"], p, s["stats"], batch, s["model_key"], 0,
                          True)[0]

  mean_grad = _flat(jax.jit(jax.grad(loss))(s["params"]))  # masked mean over `count`
  g, m = _grad(s, batch, clip=1e9, sigma=0.0, expected=EXPECTED)
  assert int(m["num_clipped"]) == 0
  want = mean_grad * s["count"] / EXPECTED  # divided by the expected, not realised, size
  got = _flat(g)
  assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_padding_rows_contribute_nothing(setup):
  s = setup
  batch, count = s["batch"], s["count"]
  # A batch of padding only (every mask 0) has an exactly zero gradient...
  none, m = _grad(s, dict(batch, mask=np.zeros_like(batch["mask"])), clip=1e9, sigma=0.0,
                  expected=EXPECTED)
  assert np.all(_flat(none) == 0) and int(m["count"]) == 0
  # ...and garbage in the padding rows (kept at mask 0) changes nothing.
  rng = np.random.default_rng(0)
  junk = dict(batch)
  junk["image"] = batch["image"].copy()
  junk["image"][count:] = rng.normal(size=junk["image"][count:].shape) * 10
  junk["label"] = batch["label"].copy()
  junk["label"][count:] = rng.integers(0, 10, size=len(batch["mask"]) - count)
  a, _ = _grad(s, batch, clip=0.1, sigma=0.0, expected=EXPECTED)
  b, mb = _grad(s, junk, clip=0.1, sigma=0.0, expected=EXPECTED)
  np.testing.assert_array_equal(_flat(a), _flat(b))
  assert int(mb["count"]) == count


def test_noise_has_std_sigma_times_clip(setup):
  s = setup
  clip, sigma = 0.5, 1.3  # std 0.65: neither sigma (1.3) nor clip (0.5) alone
  clean, _ = _grad(s, s["batch"], clip=clip, sigma=0.0, expected=EXPECTED, step=3)
  noisy, _ = _grad(s, s["batch"], clip=clip, sigma=sigma, expected=EXPECTED, step=3)
  noise = (_flat(noisy) - _flat(clean)) * EXPECTED
  n = noise.size
  assert n > 100_000
  # The sample std of n Gaussians has relative standard error 1/sqrt(2n) < 0.3%;
  # a 2% window accepts sigma*clip and rejects sigma, clip, sigma*clip/sqrt(B), ...
  assert abs(noise.std() / (sigma * clip) - 1) < 0.02
  assert abs(noise.mean()) < 5 * sigma * clip / math.sqrt(n)
  # fold_in(noise_key, step): the same step repeats its noise, another step draws afresh.
  again, _ = _grad(s, s["batch"], clip=clip, sigma=sigma, expected=EXPECTED, step=3)
  np.testing.assert_array_equal(_flat(again), _flat(noisy))
  other, _ = _grad(s, s["batch"], clip=clip, sigma=sigma, expected=EXPECTED, step=4)
  noise4 = (_flat(other) - _flat(clean)) * EXPECTED
  assert abs(np.corrcoef(noise, noise4)[0, 1]) < 0.02


@pytest.mark.parametrize("kwargs,match", [
    (dict(norm="batch"), "BatchNorm mixes samples"),
    (dict(norm="layer"), "norm must be one of"),
    (dict(l2_clip=0.0), "l2_clip must be a finite number > 0"),
    (dict(l2_clip=-1.0), "l2_clip must be a finite number > 0"),
    (dict(noise_multiplier=1.0, target_epsilon=2.0), "not both"),
    (dict(noise_multiplier=-0.5), "noise_multiplier must be"),
    (dict(target_epsilon=0.0), "target_epsilon must be"),
    (dict(delta=1.0), "delta must be in"),
    (dict(batch_size=0), "batch_size"),
    (dict(model="alexnet"), "model must be one of"),
    (dict(optimizer="lbfgs"), "optimizer must be one of"),
])
def test_config_refusals(kwargs, match):
  with pytest.raises(ValueError, match=match):
    dpsgd.DpSgdConfig(**kwargs)


def test_delta_at_least_one_over_n_is_refused(small_mnist, tmp_path):
  cfg = dpsgd.DpSgdConfig(**TINY, delta=1.0 / N_TRAIN, noise_multiplier=1.0)
  with pytest.raises(ValueError, match=r"delta must be < 1/N = 0.00333 \(N = 300"):
    cfg.validate_for(N_TRAIN)
  with pytest.raises(ValueError, match="delta must be < 1/N"):
    dpsgd.train_dpsgd(cfg, str(tmp_path / "w"), dataset=small_mnist, log=lambda _: None)
  assert not (tmp_path / "w").exists()
  with pytest.raises(ValueError, match="exceeds the 300 training examples"):
    dpsgd.DpSgdConfig(**{**TINY, "batch_size": 301}).validate_for(N_TRAIN)
  with pytest.raises(ValueError, match="unknown keys"):
    dpsgd.DpSgdConfig.from_config({"l2_clp": 1.0})


def test_epsilon_is_infinite_without_noise():
  assert dpsgd.run_epsilon(0.0, sampling_rate=0.01, steps=10, delta=1e-5) == math.inf


def test_short_run_writes_summary_with_the_accountants_epsilon(small_mnist, tmp_path,
                                                              monkeypatch):
  steps_made = []
  make_train_step = dpsgd.make_train_step
  monkeypatch.setattr(dpsgd, "make_train_step",
                      lambda *a: steps_made.append(make_train_step(*a)) or steps_made[-1])
  cfg = dpsgd.DpSgdConfig(**TINY, max_steps=3, target_epsilon=8.0, delta=1e-5)
  lines: list[str] = []
  summary = dpsgd.train_dpsgd(cfg, str(tmp_path / "run"), dataset=small_mnist,
                              log=lines.append)
  # Three Poisson batches of different realised sizes, one compilation.
  assert len(steps_made) == 1 and steps_made[0]._cache_size() == 1
  counts = {int(data_lib.poisson_batch(small_mnist.train_images, small_mnist.train_labels,
                                       EXPECTED, seed=0, step=t)[0]["mask"].sum())
            for t in range(3)}
  assert len(counts) > 1
  on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
  for key in ("method", "model", "test_accuracy", "epsilon", "delta", "noise_multiplier",
              "l2_clip", "sampling_rate", "steps", "batch_size", "wall_seconds",
              "poisson_truncated_steps"):
    assert key in on_disk, key
    assert on_disk[key] == summary[key] or key == "wall_seconds"
  assert on_disk["method"] == "dpsgd" and on_disk["steps"] == 3
  assert on_disk["sampling_rate"] == pytest.approx(EXPECTED / N_TRAIN)
  assert 0.0 <= on_disk["test_accuracy"] <= 1.0
  assert on_disk["noise_multiplier"] > 0
  want = accounting.epsilon(noise_multiplier=on_disk["noise_multiplier"],
                            sampling_rate=EXPECTED / N_TRAIN, steps=3, releases_per_step=1,
                            delta=1e-5)
  assert on_disk["epsilon"] == pytest.approx(want, rel=1e-12)
  assert 8.0 - 1e-4 <= on_disk["epsilon"] <= 8.0
  step_lines = [l for l in lines if l.startswith("step ")]
  assert len(step_lines) == 3
  assert all("epsilon" in l and "examples/s" in l and "train_acc" in l for l in step_lines)

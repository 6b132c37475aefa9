"""The judge of the central invariant: float64 sharpness, the floor, the user's batch."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from skimage import io

from asymml_jax import precision, sample_images, stages, verify
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.models import get_model
from tests.helpers.tiny_model import tiny_staged_model

DEC = DecompositionConfig(rank_fraction=0.25, tau=0.1)


@pytest.fixture(scope="module")
def model():
  return get_model("vgg11", width=0.125)


def test_float64_sees_a_float32_sized_error_that_float32_cannot(monkeypatch):
  """A relative error of 1e-7 in the trusted low-rank half: within float32's
  tolerance, far outside float64's, so only the float64 check can fail on it."""
  small = tiny_staged_model(input_shape=(16, 16, 3), channels=(8, 8), norm="group")
  orig = stages.ops.lowrank_conv
  monkeypatch.setattr(stages.ops, "lowrank_conv",
                      lambda p, u, w, spec: orig(p, u, w, spec) * (1.0 + 1e-7))
  f32 = verify.compare(small, ["inline"], batch_size=2, decomposition=DEC, floor=False)
  f64 = verify.compare(small, ["inline"], batch_size=2, decomposition=DEC, dtype="float64")
  assert set().union(*[r["modes"] for r in f64["backends"]]) & {"per_sample"}  # split
  assert f32["passed"] and f32["tolerance"] == 1e-4
  assert f64["dtype"] == "float64" and f64["tolerance"] == verify.FLOAT64_TOLERANCE
  assert f64["max_rel_err_grads"] > 100 * verify.FLOAT64_TOLERANCE and not f64["passed"]
  assert "float32_floor" not in f64  # a float32 notion
  assert not jax.config.jax_enable_x64  # compare restores the precision
  monkeypatch.setattr(stages.ops, "lowrank_conv", orig)
  exact = verify.compare(small, ["inline"], batch_size=2, decomposition=DEC, dtype="float64")
  assert exact["passed"] and exact["max_rel_err_grads"] <= verify.FLOAT64_TOLERANCE


def test_the_floor_is_the_worst_of_several_draws(model):
  v = model.init(jax.random.key(0))
  floor = verify.float32_floor(model, v, verify.random_batch(model, 2), jax.random.key(1),
                               seeds=3)
  assert len(floor["per_seed"]) == 3 and len(set(floor["per_seed"])) == 3
  assert floor["rel_err_grads"] == max(floor["per_seed"])
  assert floor["spread"] == [min(floor["per_seed"]), max(floor["per_seed"])]
  with pytest.raises(ValueError, match="at least one seed"):
    verify.float32_floor(model, v, verify.random_batch(model, 2), jax.random.key(1), seeds=0)


def test_compare_uses_the_users_batch(model):
  own = verify.compare(model, ["dense"], batch=verify.random_batch(model, 3, seed=0),
                       seed=0, floor=False)
  drawn = verify.compare(model, ["dense"], batch_size=3, seed=0, floor=False)
  other = verify.compare(model, ["dense"], batch=verify.random_batch(model, 3, seed=5),
                         seed=0, floor=False)
  assert own["batch_size"] == 3
  assert own["backends"][0]["loss"] == drawn["backends"][0]["loss"]  # the batch, as given
  assert other["backends"][0]["loss"] != own["backends"][0]["loss"]
  photos = {"image": sample_images.photo_batch(2, 32), "label": np.array([1, 7])}
  d = verify.compare(model, ["dense"], batch=photos, seed=0, floor=False)
  assert d["batch_size"] == 2 and np.isfinite(d["backends"][0]["loss"])


@pytest.mark.parametrize("batch,message", [
    ({"image": np.zeros((2, 32, 32, 3))}, "'image' and 'label'"),
    ({"image": np.zeros((2, 16, 16, 3)), "label": [0, 1]}, "expects images of shape"),
    ({"image": np.zeros((2, 32, 32, 3)), "label": [0, 10]}, r"\[0, 10\)"),
    ({"image": np.zeros((2, 32, 32, 3)), "label": [0.5, 1]}, "integers"),
    ({"image": np.full((2, 32, 32, 3), np.nan), "label": [0, 1]}, "NaN"),
])
def test_a_bad_batch_is_refused_by_name(model, batch, message):
  with pytest.raises(ValueError, match=message):
    verify.compare(model, ["dense"], batch=batch)


def test_an_unknown_dtype_is_refused_before_compiling(model):
  with pytest.raises(ValueError, match="float32, float64"):
    verify.compare(model, ["dense"], dtype="float16")


def test_batch_from_npz(tmp_path):
  path = tmp_path / "b.npz"
  images = np.random.default_rng(0).standard_normal((5, 8, 8, 1))
  np.savez(path, image=images, label=np.array([0, 3, 12, 1, 2]))
  batch, classes = verify.batch_from_npz(str(path), 4)
  assert batch["image"].shape == (4, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].tolist() == [0, 3, 12, 1] and classes == 13
  with pytest.raises(ValueError, match="holds 5 examples"):
    verify.batch_from_npz(str(path), 6)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    verify.batch_from_npz(str(tmp_path / "nope.npz"), 1)
  np.savez(path, images=images, label=np.zeros(5, int))
  with pytest.raises(ValueError, match="needs arrays 'image' and 'label'"):
    verify.batch_from_npz(str(path), 1)
  np.savez(path, image=images[..., 0], label=np.zeros(5, int))
  with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
    verify.batch_from_npz(str(path), 1)


def test_batch_from_folder(tmp_path):
  photos = (sample_images.photo_batch(4, 40) * 40 + 128).clip(0, 255).astype(np.uint8)
  for i, img in enumerate(photos):
    (tmp_path / f"class{i % 2}").mkdir(exist_ok=True)
    io.imsave(str(tmp_path / f"class{i % 2}" / f"{i}.png"), img, check_contrast=False)
  batch, classes = verify.batch_from_folder(str(tmp_path), 32, 4)
  assert batch["image"].shape == (4, 32, 32, 3) and classes == 2
  assert sorted(batch["label"].tolist()) == [0, 0, 1, 1]

"""Tests of asymml_jax.data (DESIGN section 9)."""

from __future__ import annotations

import os
import pickle

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
from skimage import io

from asymml_jax import data
from tests.helpers.cifar import write_cifar10, write_cifar100

# ----------------------------------------------------------------------------
# MNIST-5k
# ----------------------------------------------------------------------------


def test_mnist5k_shapes_and_labels():
  ds = data.load_mnist5k()
  assert ds.name == "mnist5k"
  assert ds.num_classes == 10
  assert ds.image_shape == (32, 32, 1)
  assert ds.train_images.shape == (4500, 32, 32, 1)
  assert ds.test_images.shape == (500, 32, 32, 1)
  assert ds.train_images.dtype == np.float32 and ds.test_images.dtype == np.float32
  assert ds.train_labels.shape == (4500,) and ds.test_labels.shape == (500,)
  assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
  np.testing.assert_array_equal(np.unique(ds.train_labels), np.arange(10))
  np.testing.assert_array_equal(np.unique(ds.test_labels), np.arange(10))
  assert np.isfinite(ds.train_images).all() and np.isfinite(ds.test_images).all()


def test_mnist5k_padding_is_the_background():
  ds = data.load_mnist5k(pad_to=32)
  border = np.concatenate([ds.train_images[:, :2].ravel(), ds.train_images[:, -2:].ravel(),
                           ds.train_images[:, :, :2].ravel(), ds.train_images[:, :, -2:].ravel()])
  # Zero pixels map to a single normalised value, the minimum of the data.
  np.testing.assert_allclose(border, ds.train_images.min())


def test_mnist5k_normalised_with_train_statistics():
  ds = data.load_mnist5k()
  assert abs(float(ds.train_images.mean())) < 1e-4
  assert abs(float(ds.train_images.std()) - 1.0) < 1e-4
  # The test split uses the train statistics, so it is close but not exact.
  assert abs(float(ds.test_images.mean())) < 0.1
  assert abs(float(ds.test_images.std()) - 1.0) < 0.1


def test_mnist5k_deterministic():
  a = data.load_mnist5k()
  data._load_mnist5k.cache_clear()
  data._mnist5k_raw.cache_clear()
  data.mnist5k_split_indices.cache_clear()
  b = data.load_mnist5k()
  assert a is not b
  np.testing.assert_array_equal(a.train_images, b.train_images)
  np.testing.assert_array_equal(a.train_labels, b.train_labels)
  np.testing.assert_array_equal(a.test_images, b.test_images)
  np.testing.assert_array_equal(a.test_labels, b.test_labels)
  assert data.load_mnist5k() is b  # cached in-process


def test_mnist5k_split_indices_disjoint_and_complete():
  train_idx, test_idx = data.mnist5k_split_indices()
  assert train_idx.shape == (4500,) and test_idx.shape == (500,)
  assert not set(train_idx.tolist()) & set(test_idx.tolist())
  np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, test_idx])),
                                np.arange(5000))


def test_mnist5k_pad_to_28():
  ds = data.load_mnist5k(pad_to=28)
  assert ds.image_shape == (28, 28, 1)
  assert ds.train_images.shape == (4500, 28, 28, 1)
  np.testing.assert_array_equal(ds.train_labels, data.load_mnist5k().train_labels)
  # Same digits: the unpadded images are the centre of the padded ones up to
  # the affine normalisation, so their ranks agree.
  a = ds.train_images[0, ..., 0]
  b = data.load_mnist5k().train_images[0, 2:-2, 2:-2, 0]
  np.testing.assert_array_equal(np.argsort(a.ravel(), kind="stable"),
                                np.argsort(b.ravel(), kind="stable"))


@pytest.mark.parametrize("pad_to", [30, 0, 64])
def test_mnist5k_bad_pad(pad_to):
  with pytest.raises(ValueError, match="pad_to"):
    data.load_mnist5k(pad_to=pad_to)


def test_mnist5k_cached_arrays_are_read_only():
  ds = data.load_mnist5k()
  with pytest.raises(ValueError):
    ds.train_images[0, 0, 0, 0] = 1.0


def test_mnist5k_csv_format():
  # 784 pixels (0..255) then the label in the last column.
  images, labels = data._mnist5k_raw()
  assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels), [500] * 10)


# ----------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------


def test_cifar10_loads(tmp_path):
  path = write_cifar10(str(tmp_path), n_train_per_batch=4, n_test=6)
  ds = data.load_cifar(path)
  assert ds.name == "cifar10" and ds.num_classes == 10
  assert ds.train_images.shape == (20, 32, 32, 3)
  assert ds.test_images.shape == (6, 32, 32, 3)
  assert ds.image_shape == (32, 32, 3)
  assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
  np.testing.assert_array_equal(np.unique(ds.train_labels), np.arange(10))
  np.testing.assert_allclose(ds.train_images.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(ds.train_images.std(axis=(0, 1, 2)), 1.0, atol=1e-4)


def test_cifar10_labels_and_channel_order(tmp_path):
  path = write_cifar10(str(tmp_path))
  with open(os.path.join(path, "data_batch_1"), "rb") as f:
    batch = pickle.load(f, encoding="bytes")
  ds = data.load_cifar(path)
  np.testing.assert_array_equal(ds.train_labels[:4], batch[b"labels"])
  # Channel-major rows: the first 1024 values are the red plane.
  raw = batch[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0).astype(np.float64)
  got = ds.train_images[0].astype(np.float64)
  for c in range(3):
    assert np.corrcoef(raw[..., c].ravel(), got[..., c].ravel())[0, 1] > 0.9999


def test_cifar_accepts_parent_directory(tmp_path):
  write_cifar10(str(tmp_path))
  assert data.load_cifar(str(tmp_path)).name == "cifar10"


def test_cifar100_loads(tmp_path):
  path = write_cifar100(str(tmp_path), n_train=12, n_test=5)
  ds = data.load_cifar(path)
  assert ds.name == "cifar100" and ds.num_classes == 100
  assert ds.train_images.shape == (12, 32, 32, 3)
  assert ds.test_images.shape == (5, 32, 32, 3)
  with open(os.path.join(path, "train"), "rb") as f:
    np.testing.assert_array_equal(ds.train_labels,
                                  pickle.load(f, encoding="bytes")[b"fine_labels"])


def test_cifar_num_classes_mismatch(tmp_path):
  path = write_cifar100(str(tmp_path))
  with pytest.raises(ValueError, match="cifar100"):
    data.load_cifar(path, num_classes=10)


def test_cifar_missing_dir(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="nope"):
    data.load_cifar(missing)


def test_cifar_empty_dir(tmp_path):
  with pytest.raises(ValueError, match="data_batch_1"):
    data.load_cifar(str(tmp_path))


def test_cifar_missing_batch_file(tmp_path):
  path = write_cifar10(str(tmp_path))
  os.remove(os.path.join(path, "data_batch_3"))
  with pytest.raises(FileNotFoundError, match="data_batch_3"):
    data.load_cifar(path)


def _rewrite(file, obj):
  with open(file, "wb") as f:
    pickle.dump(obj, f)


def _corrupt(path, name, how):
  file = os.path.join(path, name)
  if how == "truncated":
    with open(file, "rb") as f:
      raw = f.read()
    with open(file, "wb") as f:
      f.write(raw[:len(raw) // 2])
    return
  if how == "garbage":
    with open(file, "wb") as f:
      f.write(b"\x00this is not a pickle at all\xff" * 4)
    return
  with open(file, "rb") as f:
    batch = pickle.load(f, encoding="bytes")
  if how == "not_dict":
    batch = [batch[b"data"]]
  elif how == "missing_key":
    del batch[b"data"]
  elif how == "wrong_shape":
    batch[b"data"] = batch[b"data"][:, :1000]
  elif how == "label_range":
    key = b"labels" if b"labels" in batch else b"fine_labels"
    batch[key] = list(batch[key])
    batch[key][0] = 10 if key == b"labels" else 100
  elif how == "label_count":
    key = b"labels" if b"labels" in batch else b"fine_labels"
    batch[key] = list(batch[key])[:-1]
  _rewrite(file, batch)


@pytest.mark.parametrize("how,match", [
    ("truncated", "not a readable CIFAR pickle"),
    ("garbage", "not a readable CIFAR pickle"),
    ("not_dict", "expected a pickled dict"),
    ("missing_key", "missing key"),
    ("wrong_shape", r"shape \(N, 3072\)"),
    ("label_range", "out of range"),
    ("label_count", r"must hold \d+ labels"),
])
@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_malformed(tmp_path, kind, how, match):
  if kind == "cifar10":
    path, name = write_cifar10(str(tmp_path)), "test_batch"
  else:
    path, name = write_cifar100(str(tmp_path)), "train"
  _corrupt(path, name, how)
  with pytest.raises(ValueError, match=match) as info:
    data.load_cifar(path)
  assert name in str(info.value)


# ----------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------


def _write_folder(root, sizes=((10, 12), (7, 9), (16, 16))):
  rng = np.random.default_rng(0)
  for c, cls in enumerate(["cat", "dog"]):
    os.makedirs(root / cls)
    for i, (h, w) in enumerate(sizes):
      io.imsave(str(root / cls / f"rgb_{i}.png"),
                rng.integers(0, 256, (h, w, 3), dtype=np.uint8), check_contrast=False)
  io.imsave(str(root / "cat" / "gray.png"), rng.integers(0, 256, (9, 11), dtype=np.uint8),
            check_contrast=False)
  io.imsave(str(root / "dog" / "rgba.png"), rng.integers(0, 256, (13, 8, 4), dtype=np.uint8),
            check_contrast=False)
  (root / "dog" / "notes.txt").write_text("not an image")


def test_image_folder_loads(tmp_path):
  root = tmp_path / "pets"
  _write_folder(root)
  ds = data.load_image_folder(str(root), image_size=(8, 10), test_fraction=0.25, seed=1)
  assert ds.name == "pets" and ds.num_classes == 2
  assert ds.image_shape == (8, 10, 3)
  assert ds.train_images.shape[0] + ds.test_images.shape[0] == 8
  assert ds.test_images.shape[0] == 2
  assert ds.train_images.dtype == np.float32 and ds.train_labels.dtype == np.int32
  assert sorted(np.concatenate([ds.train_labels, ds.test_labels]).tolist()) == [0] * 4 + [1] * 4
  np.testing.assert_allclose(ds.train_images.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  again = data.load_image_folder(str(root), image_size=(8, 10), test_fraction=0.25, seed=1)
  np.testing.assert_array_equal(ds.train_images, again.train_images)
  np.testing.assert_array_equal(ds.test_labels, again.test_labels)


def test_image_folder_gray_becomes_three_equal_channels(tmp_path):
  root = tmp_path / "g"
  for cls in ("a", "b"):
    os.makedirs(root / cls)
    io.imsave(str(root / cls / "x.png"), np.full((6, 6), 200, np.uint8), check_contrast=False)
    io.imsave(str(root / cls / "y.png"), np.full((6, 6), 50, np.uint8), check_contrast=False)
  ds = data.load_image_folder(str(root), image_size=(4, 4), test_fraction=0.25)
  images = np.concatenate([ds.train_images, ds.test_images])
  assert images.shape[1:] == (4, 4, 3)
  # The three channels have equal statistics, hence equal normalised values.
  np.testing.assert_allclose(images[..., 0], images[..., 1], atol=1e-5)
  np.testing.assert_allclose(images[..., 0], images[..., 2], atol=1e-5)


def test_image_folder_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing_dir"):
    data.load_image_folder(str(tmp_path / "missing_dir"))


def test_image_folder_one_class(tmp_path):
  os.makedirs(tmp_path / "only")
  io.imsave(str(tmp_path / "only" / "a.png"), np.zeros((4, 4, 3), np.uint8),
            check_contrast=False)
  with pytest.raises(ValueError, match="at least 2 class"):
    data.load_image_folder(str(tmp_path))


def test_image_folder_empty_class(tmp_path):
  _write_folder(tmp_path)
  os.makedirs(tmp_path / "zebra")
  (tmp_path / "zebra" / "readme.txt").write_text("x")
  with pytest.raises(ValueError, match="zebra.*no images"):
    data.load_image_folder(str(tmp_path))


def test_image_folder_unreadable_image(tmp_path):
  _write_folder(tmp_path)
  (tmp_path / "cat" / "broken.jpg").write_bytes(b"definitely not a jpeg")
  with pytest.raises(ValueError, match="broken.jpg"):
    data.load_image_folder(str(tmp_path))


def test_image_folder_bad_fraction(tmp_path):
  _write_folder(tmp_path)
  with pytest.raises(ValueError, match="test_fraction"):
    data.load_image_folder(str(tmp_path), test_fraction=1.0)


# ----------------------------------------------------------------------------
# load_dataset
# ----------------------------------------------------------------------------


def test_load_dataset_unknown_name_lists_choices():
  with pytest.raises(ValueError) as info:
    data.load_dataset("imagenet")
  for name in ("mnist5k", "cifar10", "cifar100", "image_folder"):
    assert name in str(info.value)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "image_folder"])
@pytest.mark.parametrize("path", [None, ""])
def test_load_dataset_needs_data_dir(name, path):
  with pytest.raises(ValueError, match=r"--config\.data_dir"):
    data.load_dataset(name, path)


def test_load_dataset_dispatch(tmp_path):
  assert data.load_dataset("mnist5k") is data.load_mnist5k()
  assert data.load_dataset("mnist5k", pad_to=28).image_shape == (28, 28, 1)
  assert data.load_dataset("cifar10", write_cifar10(str(tmp_path / "a"))).num_classes == 10
  assert data.load_dataset("cifar100", write_cifar100(str(tmp_path / "b"))).num_classes == 100
  with pytest.raises(ValueError, match="num_classes"):
    data.load_dataset("cifar10", write_cifar100(str(tmp_path / "c")))
  _write_folder(tmp_path / "d")
  assert data.load_dataset("image_folder", str(tmp_path / "d"),
                           image_size=(5, 5)).image_shape == (5, 5, 3)


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------


def _toy(n=24, h=3, w=2, c=1):
  images = np.arange(n * h * w * c, dtype=np.float32).reshape(n, h, w, c)
  labels = np.arange(n, dtype=np.int32) % 7
  return images, labels


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_train_batches_format():
  images, labels = _toy()
  step, batch = next(data.train_batches(images, labels, 5, seed=0))
  assert step == 0
  assert set(batch) == {"image", "label", "mask"}
  assert batch["image"].shape == (5, 3, 2, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (5,) and batch["label"].dtype == np.int32
  np.testing.assert_array_equal(batch["mask"], np.ones(5, np.float32))
  assert batch["mask"].dtype == np.float32


def test_train_batches_deterministic_and_seeded():
  images, labels = _toy()
  a = _take(data.train_batches(images, labels, 5, seed=3), 12)
  b = _take(data.train_batches(images, labels, 5, seed=3), 12)
  c = _take(data.train_batches(images, labels, 5, seed=4), 12)
  for (sa, ba), (sb, bb) in zip(a, b):
    assert sa == sb
    np.testing.assert_array_equal(ba["image"], bb["image"])
  assert any(not np.array_equal(ba["label"], bc["label"]) for (_, ba), (_, bc) in zip(a, c))


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(n=st.integers(1, 30), b=st.integers(1, 30), k=st.integers(0, 40),
                  seed=st.integers(0, 2**31))
def test_train_batches_resume(n, b, k, seed):
  hypothesis.assume(b <= n)
  images, labels = _toy(n)
  fresh = _take(data.train_batches(images, labels, b, seed=seed), k + 5)[k:]
  resumed = _take(data.train_batches(images, labels, b, seed=seed, start_step=k), 5)
  for (s1, b1), (s2, b2) in zip(fresh, resumed):
    assert s1 == s2
    np.testing.assert_array_equal(b1["image"], b2["image"])
    np.testing.assert_array_equal(b1["label"], b2["label"])


def test_train_batches_epoch_uses_documented_permutation():
  images, labels = _toy(10)
  batches = _take(data.train_batches(images, labels, 3, seed=7), 6)
  for step, batch in batches:
    epoch, i = divmod(step, 3)
    perm = np.random.default_rng([7, epoch]).permutation(10)
    np.testing.assert_array_equal(batch["image"], images[perm[3 * i:3 * i + 3]])


@pytest.mark.parametrize("n, b, seed", [(10, 3, 7), (4, 4, 0), (9, 1, 2)])
def test_step_indices_are_what_train_batches_draws(n, b, seed):
  images, labels = _toy(n)
  for step, batch in _take(data.train_batches(images, labels, b, seed=seed), 7):
    np.testing.assert_array_equal(batch["image"],
                                  images[data.step_indices(n, b, seed=seed, step=step)])


def test_train_batches_every_sample_once_per_epoch():
  images, labels = _toy(24)
  ids = images[:, 0, 0, 0]
  batches = _take(data.train_batches(images, labels, 6, seed=1), 12)  # two epochs
  for epoch in range(2):
    seen = np.concatenate([b["image"][:, 0, 0, 0] for _, b in batches[4 * epoch:4 * epoch + 4]])
    np.testing.assert_array_equal(np.sort(seen), np.sort(ids))
  first = np.concatenate([b["image"][:, 0, 0, 0] for _, b in batches[:4]])
  second = np.concatenate([b["image"][:, 0, 0, 0] for _, b in batches[4:]])
  assert not np.array_equal(first, second)  # reshuffled


@pytest.mark.parametrize("batch_size", [0, -1, 25, 2.5])
def test_train_batches_bad_batch_size(batch_size):
  images, labels = _toy(24)
  with pytest.raises(ValueError, match="batch_size"):
    data.train_batches(images, labels, batch_size, seed=0)


def test_train_batches_mismatched_lengths():
  images, labels = _toy(24)
  with pytest.raises(ValueError, match="labels"):
    data.train_batches(images, labels[:-1], 4, seed=0)


@pytest.mark.parametrize("n,b", [(24, 6), (25, 6), (5, 8), (1, 1)])
def test_eval_batches_cover_everything_once(n, b):
  images, labels = _toy(n)
  batches = list(data.eval_batches(images, labels, b))
  assert len(batches) == -(-n // b)
  for batch in batches:
    assert batch["image"].shape == (b, 3, 2, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (b,) and batch["label"].dtype == np.int32
    assert batch["mask"].shape == (b,) and batch["mask"].dtype == np.float32
  mask = np.concatenate([x["mask"] for x in batches])
  assert mask.sum() == n
  real = mask > 0
  np.testing.assert_array_equal(np.concatenate([x["image"] for x in batches])[real], images)
  np.testing.assert_array_equal(np.concatenate([x["label"] for x in batches])[real], labels)
  padded = ~real
  assert not np.concatenate([x["image"] for x in batches])[padded].any()
  assert not np.concatenate([x["label"] for x in batches])[padded].any()


def test_eval_batches_on_mnist_test_split():
  ds = data.load_mnist5k()
  batches = list(data.eval_batches(ds.test_images, ds.test_labels, 128))
  assert len(batches) == 4
  assert sum(float(b["mask"].sum()) for b in batches) == 500
  assert all(b["image"].shape == (128, 32, 32, 1) for b in batches)


def test_augment_identity_and_new_dict():
  images, labels = _toy(4, 5, 5, 2)
  batch = {"image": images, "label": labels[:4], "mask": np.ones(4, np.float32)}
  out = data.augment(batch, np.random.default_rng(0), flip=False, crop_pad=0)
  assert out is not batch and out["image"] is not batch["image"]
  np.testing.assert_array_equal(out["image"], images)
  np.testing.assert_array_equal(out["label"], batch["label"])


def test_augment_flip_and_crop():
  images, labels = _toy(64, 6, 6, 3)
  original = images.copy()
  batch = {"image": images, "label": labels, "mask": np.ones(64, np.float32)}
  flipped = data.augment(batch, np.random.default_rng(0), flip=True, crop_pad=0)["image"]
  np.testing.assert_array_equal(images, original)  # input untouched
  same = [np.array_equal(f, x) for f, x in zip(flipped, images)]
  mirrored = [np.array_equal(f, x[:, ::-1]) for f, x in zip(flipped, images)]
  assert all(s or m for s, m in zip(same, mirrored))
  assert 10 < sum(mirrored) < 54

  cropped = data.augment(batch, np.random.default_rng(1), flip=False, crop_pad=2)["image"]
  assert cropped.shape == images.shape and cropped.dtype == np.float32
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for c, p in zip(cropped, padded):
    assert any(np.array_equal(c, p[dy:dy + 6, dx:dx + 6]) for dy in range(5) for dx in range(5))
  assert sum(not np.array_equal(c, x) for c, x in zip(cropped, images)) > 32


def test_augment_bad_crop_pad():
  images, labels = _toy(2)
  with pytest.raises(ValueError, match="crop_pad"):
    data.augment({"image": images, "label": labels}, np.random.default_rng(0), flip=False,
                 crop_pad=-1)


# ------------------------------------------------------------------ Poisson
def test_poisson_max_batch_is_mean_plus_four_sd():
  assert data.poisson_max_batch(64, 4500) == 97
  assert data.poisson_max_batch(4500, 4500) == 4500  # q = 1: everyone, never more
  for bad in (0, -1, 4501):
    with pytest.raises(ValueError, match="expected batch size"):
      data.poisson_max_batch(bad, 4500)


def test_poisson_batches_are_padded_masked_and_pure():
  n = 2000
  images = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float32) + 1
  labels = (np.arange(n) % 10).astype(np.int32)
  sizes = []
  for step in range(200):
    b, truncated = data.poisson_batch(images, labels, 40, seed=5, step=step)
    assert b["image"].shape == (data.poisson_max_batch(40, n), 2, 2, 1) and not truncated
    m = b["mask"].astype(bool)
    k = int(m.sum())
    sizes.append(k)
    assert np.all(m[:k]) and not np.any(m[k:])  # real rows first
    assert np.all(b["image"][~m] == 0) and np.all(b["label"][~m] == 0)
    ids = b["image"][m, 0, 0, 0].astype(int) - 1
    assert len(set(ids)) == k  # without replacement
    np.testing.assert_array_equal(b["label"][m], labels[ids])
  # Binomial(2000, 0.02): mean 40, sd 6.26; 200 draws.
  assert abs(np.mean(sizes) - 40) < 4 * 6.26 / np.sqrt(200)
  assert 3 < np.std(sizes) < 9
  again, _ = data.poisson_batch(images, labels, 40, seed=5, step=17)
  first, _ = data.poisson_batch(images, labels, 40, seed=5, step=17)
  other, _ = data.poisson_batch(images, labels, 40, seed=6, step=17)
  np.testing.assert_array_equal(again["image"], first["image"])
  assert not np.array_equal(other["mask"] * other["image"][:, 0, 0, 0],
                            first["mask"] * first["image"][:, 0, 0, 0])


def test_poisson_truncates_an_oversized_draw_and_says_so():
  rng = np.random.default_rng(0)
  idx, mask, truncated = data.poisson_indices(100, 0.9, rng=rng, max_batch=10)
  assert truncated and mask.sum() == 10 and idx.shape == (10,)
  with pytest.raises(ValueError, match="sampling_rate"):
    data.poisson_indices(100, 0.0, rng=rng, max_batch=10)

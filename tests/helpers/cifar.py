"""Writers of tiny CIFAR-format pickle directories for tests (DESIGN section 9).

The files mimic the real python-pickle releases: dicts with ``bytes`` keys,
``b'data'`` an ``(N, 3072)`` uint8 array of channel-major RGB rows and the
labels as a list of ints.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np


def _dump(file: str, obj: Any) -> None:
  with open(file, "wb") as f:
    pickle.dump(obj, f, protocol=2)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
  return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _labels(rng: np.random.Generator, n: int, num_classes: int, offset: int) -> list[int]:
  """Labels cycling through the classes (so small sets cover many), shuffled."""
  labels = (np.arange(n) + offset) % num_classes
  return [int(x) for x in rng.permutation(labels)]


def write_cifar10(dir: str, n_train_per_batch: int = 4,  # pylint: disable=redefined-builtin
                  n_test: int = 4,
                  seed: int = 0) -> str:
  """Writes a tiny ``cifar-10-batches-py`` directory under ``dir``.

  Args:
    dir: parent folder (created if needed).
    n_train_per_batch: examples in each of ``data_batch_1..5``.
    n_test: examples in ``test_batch``.
    seed: seed of the random pixels and label order.

  Returns:
    The path of the ``cifar-10-batches-py`` directory.
  """
  rng = np.random.default_rng(seed)
  out = os.path.join(os.fspath(dir), "cifar-10-batches-py")
  os.makedirs(out, exist_ok=True)
  for i in range(1, 6):
    _dump(os.path.join(out, f"data_batch_{i}"), {
        b"batch_label": f"training batch {i} of 5".encode(),
        b"labels": _labels(rng, n_train_per_batch, 10, (i - 1) * n_train_per_batch),
        b"data": _images(rng, n_train_per_batch),
        b"filenames": [f"train_{i}_{j}.png".encode() for j in range(n_train_per_batch)],
    })
  _dump(os.path.join(out, "test_batch"), {
      b"batch_label": b"testing batch 1 of 1",
      b"labels": _labels(rng, n_test, 10, 0),
      b"data": _images(rng, n_test),
      b"filenames": [f"test_{j}.png".encode() for j in range(n_test)],
  })
  _dump(os.path.join(out, "batches.meta"), {
      b"label_names": [f"class_{c}".encode() for c in range(10)],
      b"num_cases_per_batch": n_train_per_batch,
      b"num_vis": 3072,
  })
  return out


def write_cifar100(dir: str, n_train: int = 8, n_test: int = 4,  # pylint: disable=redefined-builtin
                   seed: int = 0) -> str:
  """Writes a tiny ``cifar-100-python`` directory under ``dir``.

  Args:
    dir: parent folder (created if needed).
    n_train: examples in ``train``.
    n_test: examples in ``test``.
    seed: seed of the random pixels and label order.

  Returns:
    The path of the ``cifar-100-python`` directory.
  """
  rng = np.random.default_rng(seed)
  out = os.path.join(os.fspath(dir), "cifar-100-python")
  os.makedirs(out, exist_ok=True)
  for split, n in (("train", n_train), ("test", n_test)):
    fine = _labels(rng, n, 100, 0)
    _dump(os.path.join(out, split), {
        b"filenames": [f"{split}_{j}.png".encode() for j in range(n)],
        b"batch_label": f"{split} batch".encode(),
        b"fine_labels": fine,
        b"coarse_labels": [f // 5 for f in fine],
        b"data": _images(rng, n),
    })
  _dump(os.path.join(out, "meta"), {
      b"fine_label_names": [f"fine_{c}".encode() for c in range(100)],
      b"coarse_label_names": [f"coarse_{c}".encode() for c in range(20)],
  })
  return out

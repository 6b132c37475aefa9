"""Helpers for the enclave-bridge tests: sealed data sets, canaries, processes.

Everything here is test scaffolding; none of it is imported by the library.
"""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np

from asymml_jax.data import Dataset

#: A distinctive label sequence (the digits of pi): easy to spot if it leaks.
CANARY_LABELS = (3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3)

_COLOUR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
                  "hubble_deep_field", "colorwheel", "retina")
_GREY_PHOTOS = ("camera", "coins", "moon", "page", "text", "clock", "brick",
                "checkerboard")


def normalise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel standardisation with the train statistics (as ``asymml_jax.data``)."""
  train64 = np.asarray(train, np.float64)
  mean = train64.mean(axis=(0, 1, 2))
  std = train64.std(axis=(0, 1, 2))
  std = np.where(std > 1e-8, std, 1.0)
  norm = lambda x: ((np.asarray(x, np.float64) - mean) / std).astype(np.float32)
  return norm(train), norm(test)


def random_dataset(n_train: int = 16, n_test: int = 8, shape=(32, 32, 3),
                   num_classes: int = 10, seed: int = 0) -> Dataset:
  """Standard-normal images, labels cycling through the classes."""
  rng = np.random.default_rng(seed)
  return Dataset(
      name="random",
      train_images=rng.standard_normal((n_train, *shape)).astype(np.float32),
      train_labels=(np.arange(n_train) % num_classes).astype(np.int32),
      test_images=rng.standard_normal((n_test, *shape)).astype(np.float32),
      test_labels=((np.arange(n_test) + 3) % num_classes).astype(np.int32),
      num_classes=num_classes)


def canary_raw_images(side: int = 32) -> np.ndarray:
  """16 recognisable ``(side, side, 3)`` images in ``[0, 1]`` (float64).

  Eight colour photographs from ``skimage.data`` and eight greyscale ones as
  duotones between two colours of their own (so their three channels differ
  and the first convolution is genuinely split), all downscaled with
  anti-aliasing.
  """
  import skimage.data
  import skimage.transform
  out = []
  for name in _COLOUR_PHOTOS:
    im = np.asarray(getattr(skimage.data, name)(), np.float64)[..., :3] / 255.0
    out.append(skimage.transform.resize(im, (side, side, 3), anti_aliasing=True))
  # Duotones: each greyscale photograph between its own two bright colours.
  rng = np.random.default_rng(20240229)
  for name in _GREY_PHOTOS:
    im = np.asarray(getattr(skimage.data, name)(), np.float64) / 255.0
    g = skimage.transform.resize(im, (side, side), anti_aliasing=True)[..., None]
    dark, light = rng.uniform(0.0, 0.5, 3), rng.uniform(0.5, 1.0, 3)
    out.append(np.clip(dark + g * (light - dark), 0.0, 1.0))
  return np.stack(out)


def canary_dataset(n_test: int = 8) -> tuple[Dataset, np.ndarray]:
  """The canary data set (train: all 16 canaries; test: the first ``n_test``).

  Returns:
    ``(dataset, raw)``: the normalised data set exactly as it is sealed, and
    the raw ``[0, 1]`` images as float32.
  """
  raw = canary_raw_images().astype(np.float32)
  labels = np.asarray(CANARY_LABELS, np.int32)
  train, test = normalise(raw, raw[:n_test])
  ds = Dataset(name="canary", train_images=train, train_labels=labels,
               test_images=test, test_labels=labels[:n_test].copy(), num_classes=10)
  return ds, raw


def seal_to(ds: Dataset, directory: str | os.PathLike) -> tuple[str, str]:
  """Seals ``ds`` under ``directory``; returns ``(sealed_path, key_path)``."""
  from enclave_bridge import seal
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  key = str(d / "key.bin")
  if not os.path.exists(key):
    seal.generate_key_file(key)
  sealed = str(d / f"{ds.name}.sealed")
  seal.seal_dataset(ds, sealed, key)
  return sealed, key


def pid_gone(pid: int, within: float = 5.0) -> bool:
  """True once ``pid`` no longer exists, or is a zombie, within ``within`` seconds."""
  deadline = time.monotonic() + within
  while True:
    try:
      with open(f"/proc/{pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
      if state in ("Z", "X"):
        return True
    except (FileNotFoundError, ProcessLookupError, IndexError):
      return True
    if time.monotonic() > deadline:
      return False
    time.sleep(0.02)


# ------------------------------------------------------------ leak detectors
def _words(buf: bytes, shift: int) -> np.ndarray:
  n = (len(buf) - shift) // 4
  return np.frombuffer(buf, dtype="<u4", count=max(n, 0), offset=shift) if n > 0 else (
      np.zeros((0,), "<u4"))


class WindowIndex:
  """Finds any ``window``-word (4-byte) window of some reference arrays inside a buffer.

  Every window of ``window`` consecutive float32 words of every reference
  array (at every word offset) is indexed by its first two words; a buffer is
  searched at all four byte alignments, candidates are confirmed word by word.
  Windows with fewer than ``min_distinct`` distinct words (flat image regions,
  which any run of zeros or ones would match) are not indexed.
  """

  def __init__(self, arrays, window: int = 8, min_distinct: int = 6):
    self.window = window
    self.refs = [np.ascontiguousarray(a, dtype=np.float32).reshape(-1).view("<u4")
                 for a in arrays]
    keys, where = [], []
    for i, w in enumerate(self.refs):
      k = (w[:-1].astype(np.uint64) << np.uint64(32)) | w[1:].astype(np.uint64)
      k = k[:len(w) - window + 1]
      wins = np.lib.stride_tricks.sliding_window_view(w, window)
      distinct = 1 + (np.diff(np.sort(wins, axis=1), axis=1) != 0).sum(axis=1)
      keep = np.nonzero(distinct >= min_distinct)[0]
      keys.append(k[keep])
      where.append(np.stack([np.full(len(keep), i), keep], axis=1))
    self.count = sum(len(k) for k in keys)
    self.keys = np.concatenate(keys)
    self.where = np.concatenate(where)
    order = np.argsort(self.keys, kind="stable")
    self.keys, self.where = self.keys[order], self.where[order]

  def find(self, buf: bytes) -> list[tuple[int, int, int]]:
    """``[(array index, word offset in it, byte offset in buf), ...]`` of full matches."""
    hits = []
    buf = bytes(buf)
    for shift in range(4):
      w = _words(buf, shift)
      if len(w) < self.window:
        continue
      k = (w[:-1].astype(np.uint64) << np.uint64(32)) | w[1:].astype(np.uint64)
      pos = np.minimum(np.searchsorted(self.keys, k), len(self.keys) - 1)
      cand = np.nonzero(self.keys[pos] == k)[0]
      for p in cand:
        if p + self.window > len(w):
          continue
        lo = pos[p]
        hi = np.searchsorted(self.keys, k[p], "right")
        for i, off in self.where[lo:hi]:
          if np.array_equal(w[p:p + self.window], self.refs[i][off:off + self.window]):
            hits.append((int(i), int(off), shift + 4 * int(p)))
    return hits


def max_abs_corr(x: np.ndarray, refs: np.ndarray) -> np.ndarray:
  """Per sample of ``x``, the largest ``|Pearson r|`` with any of ``refs``.

  Both sides are centred per sample and channel (over the pixels) before the
  flattened vectors are correlated, so a mere difference of channel levels
  (colour offsets) does not count as image structure.

  Args:
    x: ``(B, H, W, C)`` (or ``(B, H, W)``).
    refs: ``(N, H, W, C)`` of the same per-sample shape as ``x``.

  Returns:
    ``(B,)`` float64.
  """
  def unit_rows(t):
    t = np.asarray(t, np.float64)
    t = t - t.mean(axis=(1, 2), keepdims=True)
    t = t.reshape(len(t), -1)
    n = np.linalg.norm(t, axis=1, keepdims=True)
    return np.divide(t, n, out=np.zeros_like(t), where=n > 0)
  return np.abs(unit_rows(x) @ unit_rows(refs).T).max(axis=1)


def max_abs_channel_corr(x: np.ndarray, refs: np.ndarray) -> np.ndarray:
  """Per sample, the largest ``|r|`` between any channel map of ``x`` and any of ``refs``.

  Args:
    x: ``(B, H, W, C)``.
    refs: ``(N, H, W, C')`` (every channel and the channel mean are compared).

  Returns:
    ``(B,)`` float64.
  """
  x = np.asarray(x, np.float64)
  refs = np.asarray(refs, np.float64)
  maps = np.concatenate([np.moveaxis(refs, -1, 1),
                         refs.mean(axis=-1)[:, None]], axis=1).reshape(-1, *refs.shape[1:3])
  per_channel = np.moveaxis(x, -1, 1)  # (B, C, H, W)
  out = np.zeros(len(x))
  for c in range(per_channel.shape[1]):
    out = np.maximum(out, max_abs_corr(per_channel[:, c], maps))
  return out

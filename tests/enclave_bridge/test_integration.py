"""End to end through ``train_and_evaluate`` with the enclave backends (DESIGN sections 2, 6).

* Canaries: a sealed data set of recognisable images and a distinctive label
  sequence is trained on with backend ``enclave`` while a recorder sees every
  frame and tensor the untrusted side receives.  No image bytes and no label
  bytes arrive; nothing received is more image-like than the declared
  first-stage residual; the classes that crossed are exactly the ledger's.
* A crash: the enclave is SIGKILLed mid-run (and, separately, the driver is
  interrupted); a rerun with the same workdir resumes from the checkpoint and
  ends exactly where an uninterrupted run ends.
* ``tee_only`` trains and evaluates through the same loop.
"""

from __future__ import annotations

import json
import os
import re
import signal

import numpy as np
import pytest

import enclave_bridge  # noqa: F401  (registers the enclave backends)
from asymml_jax import data as data_lib
from asymml_jax import train
from enclave_bridge import ledger as lg
from enclave_bridge import protocol as pr
from enclave_bridge.client import EnclaveDied
from tests.helpers import enclave as he

BATCH = 4
BASE = dict(model="vgg11", width=0.125, batch_size=BATCH, num_epochs=100.0,
            eval_batch_size=BATCH, log_every=1, warmup_steps=1, learning_rate=1e-3,
            checkpoint_every=100, seed=0)


def _ledger_classes(summary) -> tuple[set[str], set[str]]:
  led = summary["ledger"]
  return ({r["class"] for r in led["to_untrusted"]}, {r["class"] for r in led["to_enclave"]})


# =============================================================================
# Canaries
# =============================================================================
def _canary_cfg(sealed: str, key: str, workdir, **extra) -> dict:
  return dict(BASE, backend="enclave", max_steps=3,
              bridge={"sealed_path": sealed, "key_path": key, "workdir": str(workdir),
                      **extra})


def _batch_of(ds, tag: int) -> dict:
  """The batch the enclave samples for ``tag`` (train step, or eval batch ``-1 - tag``)."""
  if tag >= 0:
    return next(data_lib.train_batches(ds.train_images, ds.train_labels, BATCH,
                                       seed=BASE["seed"], start_step=tag))[1]
  return list(data_lib.eval_batches(ds.test_images, ds.test_labels, BATCH))[-1 - tag]


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory):
  """Trains 3 steps + evaluates on sealed canaries, recording what arrives.

  Each received tensor is kept with the step tag of the reply that carried it.
  """
  ds, raw = he.canary_dataset(n_test=8)
  root = tmp_path_factory.mktemp("canary")
  sealed, key = he.seal_to(ds, root / "data")
  frames: list[bytes] = []
  tensors: list[tuple[int, pr.TensorDesc, np.ndarray]] = []
  tag = [None]

  def recorder(kind, payload):
    if kind == "frame":
      frames.append(bytes(payload))
      tag[0] = pr.decode(payload).tag
    else:
      desc, arr = payload
      tensors.append((tag[0], desc, np.array(arr, copy=True)))

  lines: list[str] = []
  summary = train.train_and_evaluate(
      _canary_cfg(sealed, key, root / "enclave", recorder=recorder), str(root / "run"),
      log=lines.append)
  tags = sorted({t for t, _, _ in tensors})
  return {"ds": ds, "raw": raw, "sealed": sealed, "key": key, "frames": frames,
          "tensors": tensors, "summary": summary, "lines": lines,
          "batches": {t: _batch_of(ds, t) for t in tags}}


def test_canary_run_trained_and_saw_traffic(canary_run):
  s = canary_run["summary"]
  assert s["backend"] == "enclave" and s["steps"] == 3 and s["test_examples"] == 8
  assert np.isfinite(s["test_loss"])
  assert canary_run["frames"] and canary_run["tensors"]
  residuals = [t for t, d, _ in canary_run["tensors"] if d.name == "rs/s0"]
  # One first-stage residual per train step and per eval batch.
  assert sorted(residuals) == [-2, -1, 0, 1, 2]
  assert all(d.shape == (BATCH, 32, 32, 3) for _, d, _ in canary_run["tensors"]
             if d.name == "rs/s0")


def test_no_canary_pixels_cross(canary_run):
  ds, raw = canary_run["ds"], canary_run["raw"]
  index = he.WindowIndex(list(ds.train_images) + list(ds.test_images) + list(raw))
  assert index.count > 16 * 2000  # many 32-byte windows of every image are watched
  # The detector is not blind: a window planted at an odd offset is found.
  rng = np.random.default_rng(0)
  planted = rng.bytes(999) + ds.train_images[5].tobytes()[4000:4032] + rng.bytes(77)
  assert any(off == 999 for _, _, off in index.find(planted))
  hits = []
  for body in canary_run["frames"]:
    hits += [("frame", h) for h in index.find(body)]
  for _, desc, arr in canary_run["tensors"]:
    hits += [(desc.name, h) for h in index.find(arr.tobytes())]
  assert not hits, f"canary image bytes reached the untrusted side: {hits[:5]}"


def _label_patterns(canary_run) -> dict[str, bytes]:
  ds = canary_run["ds"]
  pats = {"train_labels_i32": ds.train_labels.astype("<i4").tobytes(),
          "test_labels_i32": ds.test_labels.astype("<i4").tobytes()}
  for t, b in canary_run["batches"].items():
    y = np.asarray(b["label"])
    pats[f"batch{t}_i32"] = y.astype("<i4").tobytes()
    pats[f"batch{t}_f32"] = y.astype("<f4").tobytes()
    pats[f"batch{t}_onehot"] = np.eye(10, dtype="<f4")[y].tobytes()
  return pats


def test_no_label_bytes_cross(canary_run):
  pats = _label_patterns(canary_run)
  assert len(pats) == 2 + 3 * 5
  payloads = [("frame", b) for b in canary_run["frames"]] + [
      (d.name, a.tobytes()) for _, d, a in canary_run["tensors"]]
  found = [(pname, where) for pname, p in pats.items() for where, buf in payloads
           if p in buf]
  assert not found, f"label bytes reached the untrusted side: {found[:5]}"
  # No received tensor is integer, nor a batch's label vector or one-hot code.
  for _, desc, arr in canary_run["tensors"]:
    assert arr.dtype.kind == "f", desc
    for b in canary_run["batches"].values():
      y = np.asarray(b["label"])
      if arr.shape == y.shape:
        assert not np.array_equal(arr, y.astype(arr.dtype)), desc
      if arr.shape == (len(y), 10):
        assert not np.array_equal(arr, np.eye(10, dtype=arr.dtype)[y]), desc


def _pool(images: np.ndarray, h: int, w: int) -> np.ndarray:
  n, H, W, C = images.shape
  return images.reshape(n, h, H // h, w, W // w, C).mean(axis=(2, 4))


def _own_channel_corr(arr: np.ndarray, images: np.ndarray) -> np.ndarray:
  """Per sample, the largest |r| of a channel map of ``arr`` with its own image's maps."""
  ref = _pool(images, arr.shape[1], arr.shape[2])
  return np.array([he.max_abs_channel_corr(arr[i:i + 1], ref[i:i + 1])[0]
                   for i in range(len(arr))])


def test_nothing_received_is_more_image_like_than_the_residual(canary_run):
  """|Pearson r| of what arrives with its own source image (DESIGN section 2).

  Every received ``(B, H, W, C)`` tensor of resolution 8x8 or more is
  compared, sample by sample, with the canary that sample came from (the
  enclave's batch for that step is known here): the largest |r| of any of its
  channel maps with any channel (or the mean) of the image block-averaged to
  its resolution.  The declared first-stage residual ``rs/s0`` bounds every
  other tensor class (mean and max over samples, margin 0.05).  The residual
  as a whole image (channels centred, flattened) is also compared with the
  image itself (|r| = 1).
  """
  ds = canary_run["ds"]
  per_name: dict[str, list[np.ndarray]] = {}
  noise: dict[str, list[np.ndarray]] = {}
  whole, raw_self = [], []
  rng = np.random.default_rng(0)
  for tag, desc, arr in canary_run["tensors"]:
    if arr.ndim != 4 or arr.shape[1] < 8 or 32 % arr.shape[1] or 32 % arr.shape[2]:
      continue
    batch = canary_run["batches"][tag]
    real = batch["mask"] > 0
    images = batch["image"]
    per_name.setdefault(desc.name, []).append(_own_channel_corr(arr, images)[real])
    noise.setdefault(desc.name, []).append(
        _own_channel_corr(rng.standard_normal(arr.shape), images)[real])
    if desc.name == "rs/s0":
      whole.append(np.array([he.max_abs_corr(arr[i:i + 1], images[i:i + 1])[0]
                             for i in range(len(arr))])[real])
      raw_self.append(np.array([he.max_abs_corr(images[i:i + 1], images[i:i + 1])[0]
                                for i in range(len(arr))])[real])
  vals = {k: np.concatenate(v) for k, v in per_name.items()}
  whole, raw_self = np.concatenate(whole), np.concatenate(raw_self)
  print(f"\ncanary |r| with the own image: first-stage residual rs/s0 as a whole image: "
        f"mean {whole.mean():.3f}, median {np.median(whole):.3f}, max {whole.max():.3f} "
        f"(raw image: {raw_self.min():.3f})")
  print("  per channel map (mean / max over samples; Gaussian noise of the same shape):")
  for k in sorted(vals, key=lambda k: -vals[k].mean()):
    print(f"  {k:12s} {vals[k].mean():.3f} / {vals[k].max():.3f}   "
          f"(noise {np.concatenate(noise[k]).mean():.3f})")
  assert set(vals) >= {"rs/s0", "dyr/conv0", "rs/s1"}
  ref = vals["rs/s0"]
  assert ref.mean() > 3 * np.concatenate(noise["rs/s0"]).mean()  # the measure sees images
  margin = 0.05
  worse = {k: (round(float(v.mean()), 3), round(float(v.max()), 3)) for k, v in vals.items()
           if k != "rs/s0" and (v.mean() > ref.mean() + margin or v.max() > ref.max() + margin)}
  assert not worse, f"received tensors more image-like than the residual: {worse}"
  # The residual is far less image-like than the image itself (|r| = 1).  Per
  # sample it can come close: a low-contrast duotone's residual keeps the
  # texture at a fraction of the energy; privacy noise (off here) hides that.
  np.testing.assert_allclose(raw_self, 1.0, atol=1e-6)
  assert whole.mean() <= 0.6 and np.median(whole) <= 0.6


def test_traffic_classes_are_exactly_the_ledger(canary_run):
  s = canary_run["summary"]
  to_untrusted, to_enclave = _ledger_classes(s)
  expected = lg.expected_classes("enclave", train=True, batch_norm=True)
  assert to_untrusted | to_enclave == expected
  assert all(lg.LEDGER[c].direction == lg.TO_UNTRUSTED for c in to_untrusted)
  assert all(lg.LEDGER[c].direction == lg.TO_ENCLAVE for c in to_enclave)
  # What the recorder saw matches what the client counted.
  assert {d.cls for _, d, _ in canary_run["tensors"]} == to_untrusted


# =============================================================================
# Crash and resume
# =============================================================================
class _Killer:
  """Recorder that SIGKILLs the enclave when the first reply of step ``at`` arrives."""

  def __init__(self, at: int):
    self.at, self.pid, self.killed = at, None, False

  def __call__(self, kind, payload):
    if kind != "frame":
      return
    msg = pr.decode(payload)
    if self.pid is None and "pid" in msg.meta:  # the HELLO reply
      self.pid = int(msg.meta["pid"])
    if msg.tag == self.at and not self.killed:
      self.killed = True
      os.kill(self.pid, signal.SIGKILL)


@pytest.mark.fault("enclave_sigkill_forward", "enclave_sigkill_backward",
                   "enclave_sigkill_between_calls")
@pytest.mark.parametrize("crash", [
    "enclave_killed", pytest.param("driver_interrupted", marks=pytest.mark.slow)])
def test_crash_then_resume_matches_an_uninterrupted_run(canary_run, tmp_path, crash):
  """The canary run (3 steps, never interrupted) is the reference."""
  reference = canary_run["summary"]
  sealed, key = canary_run["sealed"], canary_run["key"]
  run = tmp_path / "run"
  if crash == "enclave_killed":
    killer = _Killer(at=2)
    cfg = {**_canary_cfg(sealed, key, tmp_path / "enclave", recorder=killer),
           "checkpoint_every": 2}
    with pytest.raises(EnclaveDied):
      train.train_and_evaluate(cfg, str(run), log=lambda line: None)
    assert killer.killed and killer.pid is not None
    assert he.pid_gone(killer.pid)
    resume_step = 2  # the periodic checkpoint taken just before step 2 began
  else:
    pids = []

    def interrupt_at_step_2(line):
      if line.startswith("step 2/"):
        raise KeyboardInterrupt

    def pid_of(kind, payload):
      if kind == "frame":
        meta = pr.decode(payload).meta
        if "pid" in meta:
          pids.append(int(meta["pid"]))
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(_canary_cfg(sealed, key, tmp_path / "enclave", recorder=pid_of),
                               str(run), log=interrupt_at_step_2)
    assert len(pids) == 1 and he.pid_gone(pids[0])  # Ctrl-C stops the enclave too
    resume_step = 2  # saved on the way out
  # Nothing half-written: no summary, only whole checkpoints.
  assert not (run / "summary.json").exists()
  steps = sorted(int(p) for p in os.listdir(run / "checkpoints") if p.isdigit())
  assert steps and steps[-1] == resume_step
  assert not [p for p in os.listdir(run / "checkpoints") if "tmp" in p.lower()]

  lines: list[str] = []
  resumed = train.train_and_evaluate(_canary_cfg(sealed, key, tmp_path / "enclave2"),
                                     str(run), log=lines.append)
  assert resumed["resumed_from"] == resume_step
  assert f"resumed from checkpoint at step {resume_step}" in lines
  assert resumed["steps"] == reference["steps"] == 3
  # Same seeds, same sealing key: same batches, same trusted decompositions.
  assert resumed["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-5)
  assert resumed["test_accuracy"] == pytest.approx(reference["test_accuracy"])
  on_disk = json.loads((run / "summary.json").read_text())
  assert on_disk["resumed_from"] == resume_step


# =============================================================================
# tee_only through the training loop
# =============================================================================
def test_tee_only_train_and_evaluate(canary_run, tmp_path):
  sealed_path, key_path = canary_run["sealed"], canary_run["key"]
  cfg = dict(BASE, backend="tee_only", max_steps=2,
             bridge={"sealed_path": sealed_path, "key_path": key_path,
                     "workdir": str(tmp_path / "enclave")})
  lines: list[str] = []
  s = train.train_and_evaluate(cfg, str(tmp_path / "run"), log=lines.append)
  losses = [float(m.group(1)) for m in
            (re.search(r"^step \d+/\d+\s+loss (\S+)", l) for l in lines) if m]
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert s["backend"] == "tee_only" and s["test_examples"] == 8
  assert np.isfinite(s["test_loss"]) and 0.0 <= s["test_accuracy"] <= 1.0
  to_untrusted, to_enclave = _ledger_classes(s)
  assert to_untrusted | to_enclave == lg.expected_classes("tee_only", train=True,
                                                          batch_norm=True)

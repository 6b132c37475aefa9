"""Tests of enclave_bridge.seal: the AES-GCM data-set container (DESIGN sections 2, 6)."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import subprocess
import sys

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from asymml_jax.data import Dataset, load_dataset
from enclave_bridge import seal

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIELDS = ("train_images", "train_labels", "test_images", "test_labels")


def _tiny_dataset(name: str = "tiny") -> Dataset:
  rng = np.random.default_rng(0)
  return Dataset(
      name=name,
      train_images=rng.standard_normal((6, 4, 5, 3)).astype(np.float32),
      train_labels=np.array([0, 1, 2, 0, 1, 2], np.int32),
      test_images=rng.standard_normal((3, 4, 5, 3)).astype(np.float32),
      test_labels=np.array([2, 1, 0], np.int32),
      num_classes=3,
  )


def _assert_same(a: Dataset, b: Dataset) -> None:
  assert a.name == b.name and a.num_classes == b.num_classes
  for field in FIELDS:
    x, y = getattr(a, field), getattr(b, field)
    assert x.dtype == y.dtype and x.shape == y.shape, field
    np.testing.assert_array_equal(x, y, err_msg=field)


def _layout(blob: bytes) -> dict[str, int]:
  """Offsets of the documented format: prefix, header, nonce, ciphertext, tag."""
  header_len = int.from_bytes(blob[9:13], "big")
  nonce = 13 + header_len
  return {"header": 13, "header_end": nonce, "nonce": nonce, "ciphertext": nonce + 12,
          "tag": len(blob) - 16, "end": len(blob)}


@pytest.fixture
def key(tmp_path) -> str:
  path = str(tmp_path / "key.bin")
  seal.generate_key_file(path)
  return path


@pytest.fixture
def sealed(tmp_path, key) -> tuple[str, bytes, Dataset]:
  ds = _tiny_dataset()
  path = str(tmp_path / "tiny.sealed")
  seal.seal_dataset(ds, path, key)
  return path, pathlib.Path(path).read_bytes(), ds


def _write(tmp_path, blob: bytes, name: str = "bad.sealed") -> str:
  path = tmp_path / name
  path.write_bytes(blob)
  return str(path)


# ----------------------------------------------------------------------------
# Round trips and the documented format
# ----------------------------------------------------------------------------


def test_round_trip_tiny(sealed, key):
  path, _, ds = sealed
  out = seal.unseal_dataset(path, key)
  _assert_same(ds, out)
  assert out.image_shape == (4, 5, 3)
  assert seal.is_sealed(path)


def test_round_trip_mnist5k_and_no_plaintext_window(tmp_path, key):
  ds = load_dataset("mnist5k")
  path = str(tmp_path / "mnist.sealed")
  header = seal.seal_dataset(ds, path, key)
  assert header["name"] == "mnist5k" and header["num_classes"] == 10
  _assert_same(ds, seal.unseal_dataset(path, key))
  blob = pathlib.Path(path).read_bytes()
  # Normalised MNIST is mostly one repeated background value, so an
  # unencrypted (or ECB-like) payload would certainly contain these windows.
  train, test = ds.train_images.tobytes(), ds.test_images.tobytes()
  labels = ds.train_labels.tobytes()
  windows = [train[:16], train[len(train) // 2:len(train) // 2 + 16], train[-16:],
             test[1000:1016], test[-16:], labels[:16], ds.train_images[0, 0].tobytes()[:16]]
  for window in windows:
    assert len(window) == 16
    assert window not in blob


def test_layout_matches_the_documented_format(sealed, key):
  path, blob, ds = sealed
  assert blob[:8] == b"ASYMSEAL" and blob[8] == 1
  at = _layout(blob)
  header_bytes = blob[at["header"]:at["header_end"]]
  header = json.loads(header_bytes)
  assert header_bytes == json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
  aad = blob[:at["nonce"]]
  payload = AESGCM(seal.read_key_file(key)).decrypt(
      blob[at["nonce"]:at["ciphertext"]], blob[at["ciphertext"]:], aad)
  expected = b"".join(getattr(ds, f).astype(d).tobytes()
                      for f, d in zip(FIELDS, ("<f4", "<i4", "<f4", "<i4")))
  assert payload == expected
  assert header["payload_bytes"] == len(expected)
  assert [a["name"] for a in header["arrays"]] == list(FIELDS)


def test_header_is_public_and_holds_no_pixels(sealed):
  path, blob, ds = sealed
  header = seal.read_header(path)  # No key.
  assert set(header) == {"arrays", "cipher", "created", "format", "format_version", "name",
                         "num_classes", "payload_bytes"}
  assert header["format"] == "ASYMSEAL" and header["format_version"] == 1
  assert header["cipher"] == "AES-256-GCM" and header["name"] == "tiny"
  assert header["num_classes"] == 3
  assert {a["name"]: (a["dtype"], a["shape"]) for a in header["arrays"]} == {
      "train_images": ("<f4", [6, 4, 5, 3]), "train_labels": ("<i4", [6]),
      "test_images": ("<f4", [3, 4, 5, 3]), "test_labels": ("<i4", [3])}
  assert header["created"].endswith("Z")
  at = _layout(blob)
  assert at["header_end"] - at["header"] < 1024
  for value in ds.train_images.ravel()[:10]:
    assert repr(float(value))[:8] not in json.dumps(header)


def test_seal_returns_the_header(tmp_path, key):
  header = seal.seal_dataset(_tiny_dataset(), str(tmp_path / "a"), key)
  assert header == seal.read_header(str(tmp_path / "a"))


def test_two_seals_use_fresh_nonces(tmp_path, key):
  a = seal.seal_dataset(_tiny_dataset(), str(tmp_path / "a"), key)
  seal.seal_dataset(_tiny_dataset(), str(tmp_path / "b"), key)
  blob_a, blob_b = (tmp_path / "a").read_bytes(), (tmp_path / "b").read_bytes()
  at = _layout(blob_a)
  assert a["payload_bytes"] > 0
  assert blob_a[at["nonce"]:at["ciphertext"]] != blob_b[at["nonce"]:at["ciphertext"]]
  assert blob_a[at["ciphertext"]:] != blob_b[at["ciphertext"]:]


def test_unsealed_arrays_are_read_only(sealed, key):
  out = seal.unseal_dataset(sealed[0], key)
  for field in FIELDS:
    assert not getattr(out, field).flags.writeable


# ----------------------------------------------------------------------------
# Wrong key, tampering, truncation
# ----------------------------------------------------------------------------


@pytest.mark.fault("wrong_key")
def test_wrong_key_is_refused(sealed, tmp_path):
  path = sealed[0]
  other = str(tmp_path / "other.key")
  seal.generate_key_file(other)
  with pytest.raises(seal.WrongKeyOrTampered, match=f"wrong key or tampered file: {path}"):
    seal.unseal_dataset(path, other)


def _flip_positions(blob: bytes) -> list[tuple[str, int]]:
  at = _layout(blob)
  positions = [("header", i) for i in range(at["header"], at["header_end"])]
  positions += [("nonce", i) for i in range(at["nonce"], at["ciphertext"])]
  middle = (at["ciphertext"] + at["tag"]) // 2
  positions += [("ciphertext", i) for i in (at["ciphertext"], at["ciphertext"] + 1, middle,
                                             at["tag"] - 1)]
  positions += [("tag", i) for i in range(at["tag"], at["end"])]
  return positions


@pytest.mark.fault("tampered_sealed_file")
@pytest.mark.parametrize("region", ["header", "nonce", "ciphertext", "tag"])
@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_any_flipped_byte_is_refused(sealed, key, tmp_path, region, mask):
  path, blob, _ = sealed
  positions = [i for r, i in _flip_positions(blob) if r == region]
  assert positions
  for i in positions:
    bad = bytearray(blob)
    bad[i] ^= mask
    bad_path = _write(tmp_path, bytes(bad))
    with pytest.raises(seal.WrongKeyOrTampered, match="wrong key or tampered file"):
      seal.unseal_dataset(bad_path, key)


@pytest.mark.fault("tampered_sealed_file")
@pytest.mark.parametrize("offset", [9, 10, 11, 12])
def test_flipped_header_length_is_refused(sealed, key, tmp_path, offset):
  blob = bytearray(sealed[1])
  blob[offset] ^= 0x01
  with pytest.raises(seal.SealError):
    seal.unseal_dataset(_write(tmp_path, bytes(blob)), key)


def test_flipped_magic_and_version_are_malformed(sealed, key, tmp_path):
  blob = sealed[1]
  for i in range(9):
    bad = bytearray(blob)
    bad[i] ^= 0x01
    with pytest.raises(seal.MalformedContainer):
      seal.unseal_dataset(_write(tmp_path, bytes(bad)), key)


@pytest.mark.parametrize("where", ["empty", "in_magic", "in_length", "in_header", "in_nonce",
                                   "in_ciphertext", "in_tag", "last_byte"])
def test_truncation_is_refused(sealed, key, tmp_path, where):
  path, blob, _ = sealed
  at = _layout(blob)
  cut = {"empty": 0, "in_magic": 4, "in_length": 11, "in_header": at["header"] + 20,
         "in_nonce": at["nonce"] + 5, "in_ciphertext": (at["ciphertext"] + at["tag"]) // 2,
         "in_tag": at["tag"] + 8, "last_byte": len(blob) - 1}[where]
  bad_path = _write(tmp_path, blob[:cut])
  with pytest.raises(seal.MalformedContainer):
    seal.unseal_dataset(bad_path, key)
  with pytest.raises(seal.MalformedContainer):
    seal.read_header(bad_path)


def test_trailing_bytes_are_refused(sealed, key, tmp_path):
  bad_path = _write(tmp_path, sealed[1] + b"\0")
  with pytest.raises(seal.MalformedContainer, match="trailing"):
    seal.unseal_dataset(bad_path, key)


def test_bad_magic_garbage_and_unsupported_version(sealed, key, tmp_path):
  blob = sealed[1]
  bad = _write(tmp_path, b"NOTASEAL" + blob[8:], "magic")
  with pytest.raises(seal.MalformedContainer, match="bad magic"):
    seal.unseal_dataset(bad, key)
  with pytest.raises(seal.MalformedContainer, match="bad magic"):
    seal.read_header(bad)
  assert not seal.is_sealed(bad)
  garbage = _write(tmp_path, np.random.default_rng(1).bytes(4096), "garbage")
  with pytest.raises(seal.MalformedContainer):
    seal.unseal_dataset(garbage, key)
  assert not seal.is_sealed(garbage)
  v2 = _write(tmp_path, blob[:8] + bytes([2]) + blob[9:], "v2")
  with pytest.raises(seal.MalformedContainer, match="unsupported container format version 2"):
    seal.unseal_dataset(v2, key)
  assert seal.is_sealed(v2)


def test_oversized_header_length_is_refused(sealed, key, tmp_path):
  blob = sealed[1]
  for length in ((1 << 20) + 1, 0xFFFFFFFF, 0):
    bad = _write(tmp_path, blob[:9] + length.to_bytes(4, "big") + blob[13:])
    with pytest.raises(seal.MalformedContainer, match="header length"):
      seal.unseal_dataset(bad, key)


def test_is_sealed_for_missing_and_plain_files(tmp_path):
  assert not seal.is_sealed(str(tmp_path / "missing"))
  assert not seal.is_sealed(str(tmp_path))
  assert not seal.is_sealed(_write(tmp_path, b"", "empty"))


def test_missing_container(tmp_path, key):
  with pytest.raises(FileNotFoundError, match="missing"):
    seal.unseal_dataset(str(tmp_path / "missing"), key)


def _forge(key_path: str, header: dict, payload: bytes) -> bytes:
  """A container with a valid tag over arbitrary content (the key holder can)."""
  header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
  aad = b"ASYMSEAL\x01" + len(header_bytes).to_bytes(4, "big") + header_bytes
  nonce = os.urandom(12)
  return aad + nonce + AESGCM(seal.read_key_file(key_path)).encrypt(nonce, payload, aad)


def test_authenticated_but_invalid_content_is_malformed(sealed, key, tmp_path):
  path, _, ds = sealed
  header = seal.read_header(path)
  images = [ds.train_images.copy(), ds.test_images]
  labels = [ds.train_labels.copy(), ds.test_labels]

  def payload() -> bytes:
    return b"".join(a.tobytes() for a in (images[0], labels[0], images[1], labels[1]))

  labels[0][0] = 3  # num_classes is 3.
  bad = _write(tmp_path, _forge(key, header, payload()), "label")
  with pytest.raises(seal.MalformedContainer, match="train_labels out of range"):
    seal.unseal_dataset(bad, key)
  labels[0][0] = 0
  images[0][0, 0, 0, 0] = np.nan
  bad = _write(tmp_path, _forge(key, header, payload()), "nan")
  with pytest.raises(seal.MalformedContainer, match="NaN or Inf"):
    seal.unseal_dataset(bad, key)
  images[0][0, 0, 0, 0] = ds.train_images[0, 0, 0, 0]
  forged = dict(header, arrays=[dict(a) for a in header["arrays"]])
  forged["arrays"][1]["shape"] = [5]
  forged["payload_bytes"] -= 4
  bad = _write(tmp_path, _forge(key, forged, payload()[:-4]), "shape")
  with pytest.raises(seal.MalformedContainer, match="train_labels shape"):
    seal.unseal_dataset(bad, key)
  # And the unmodified content under the same forging path is accepted.
  good = _write(tmp_path, _forge(key, header, payload()), "good")
  _assert_same(ds, seal.unseal_dataset(good, key))


# ----------------------------------------------------------------------------
# Sealing refuses bad input and writes nothing half-written
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(train_labels=np.array([0, 1, 2, 0, 1, 3], np.int32)), "out of range"),
    (dict(test_labels=np.array([-1, 1, 0], np.int32)), "out of range"),
    (dict(test_images=np.full((3, 4, 5, 3), np.inf, np.float32)), "NaN or Inf"),
    (dict(train_images=np.zeros((6, 4, 5, 3), np.float64)), "must be float32"),
    (dict(train_labels=np.zeros((6,), np.float32)), "must be integers"),
])
def test_seal_refuses_invalid_data(tmp_path, key, change, message):
  ds = _tiny_dataset()
  bad = Dataset(**{**{f: getattr(ds, f) for f in FIELDS}, "name": ds.name,
                   "num_classes": ds.num_classes, **change})
  with pytest.raises(ValueError, match=message):
    seal.seal_dataset(bad, str(tmp_path / "out"), key)
  assert sorted(os.listdir(tmp_path)) == ["key.bin"]


def test_seal_refuses_to_overwrite_its_key(tmp_path, key):
  with pytest.raises(ValueError, match="own key file"):
    seal.seal_dataset(_tiny_dataset(), key, key)
  assert len(seal.read_key_file(key)) == 32


def test_seal_replaces_an_existing_container_atomically(tmp_path, key):
  path = str(tmp_path / "c")
  seal.seal_dataset(_tiny_dataset("first"), path, key)
  seal.seal_dataset(_tiny_dataset("second"), path, key)
  assert seal.unseal_dataset(path, key).name == "second"
  assert sorted(os.listdir(tmp_path)) == ["c", "key.bin"]


# ----------------------------------------------------------------------------
# Key files
# ----------------------------------------------------------------------------


def test_generated_key_file(tmp_path):
  path = str(tmp_path / "k")
  seal.generate_key_file(path)
  data = pathlib.Path(path).read_bytes()
  assert len(data) == seal.KEY_BYTES == 32
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  assert seal.read_key_file(path) == data
  assert sorted(os.listdir(tmp_path)) == ["k"]  # No temporary file left behind.
  other = str(tmp_path / "k2")
  seal.generate_key_file(other)
  assert pathlib.Path(other).read_bytes() != data


def test_generate_key_refuses_overwrite(tmp_path):
  path = str(tmp_path / "k")
  seal.generate_key_file(path)
  before = pathlib.Path(path).read_bytes()
  with pytest.raises(seal.KeyFileError, match="already exists"):
    seal.generate_key_file(path)
  assert pathlib.Path(path).read_bytes() == before
  seal.generate_key_file(path, overwrite=True)
  assert pathlib.Path(path).read_bytes() != before
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  with pytest.raises(seal.KeyFileError, match="does not exist"):
    seal.generate_key_file(str(tmp_path / "no" / "k"))


def test_generate_key_file_with_a_given_key(tmp_path):
  path, key = str(tmp_path / "k"), bytes(range(32))
  seal.generate_key_file(path, key=key)
  assert seal.read_key_file(path) == key
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  for size in (0, 16, 33):
    with pytest.raises(seal.KeyFileError, match="a key has 32 bytes, got"):
      seal.generate_key_file(str(tmp_path / f"k{size}"), key=b"k" * size)
    assert not (tmp_path / f"k{size}").exists()


def test_read_key_file_errors(tmp_path):
  with pytest.raises(seal.KeyFileError, match="does not exist"):
    seal.read_key_file(str(tmp_path / "missing"))
  for size in (0, 16, 31, 33, 64):
    path = _write(tmp_path, b"k" * size, f"k{size}")
    with pytest.raises(seal.KeyFileError, match="exactly 32 raw bytes"):
      seal.read_key_file(path)
  with pytest.raises(seal.KeyFileError, match="directory"):
    seal.read_key_file(str(tmp_path))


def test_unseal_with_a_bad_key_file(sealed, tmp_path):
  with pytest.raises(seal.KeyFileError, match="does not exist"):
    seal.unseal_dataset(sealed[0], str(tmp_path / "missing"))


def test_exception_hierarchy():
  for cls in (seal.WrongKeyOrTampered, seal.MalformedContainer, seal.KeyFileError):
    assert issubclass(cls, seal.SealError)
  assert issubclass(seal.SealError, Exception)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "enclave_bridge.seal", *args], cwd=ROOT,
                        env=env, text=True, capture_output=True, timeout=120)


def test_cli_seals_mnist5k_with_a_new_key(tmp_path):
  out, key = tmp_path / "mnist.sealed", tmp_path / "mnist.key"
  p = _cli("--dataset=mnist5k", f"--out={out}", f"--key={key}", "--new_key")
  assert p.returncode == 0, p.stderr
  header = json.loads(p.stdout)
  assert header == seal.read_header(str(out))
  assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
  ds = seal.unseal_dataset(str(out), str(key))
  _assert_same(load_dataset("mnist5k"), ds)
  # Sealing again with the existing key (no --new_key) works; --new_key is refused.
  p = _cli("--dataset=mnist5k", f"--out={tmp_path / 'again'}", f"--key={key}")
  assert p.returncode == 0, p.stderr
  before = key.read_bytes()
  p = _cli("--dataset=mnist5k", f"--out={tmp_path / 'third'}", f"--key={key}", "--new_key")
  assert p.returncode != 0 and "already exists" in p.stderr
  assert "Traceback" not in p.stderr
  assert key.read_bytes() == before and not (tmp_path / "third").exists()


def test_cli_missing_key_without_new_key(tmp_path):
  out, key = tmp_path / "x.sealed", tmp_path / "missing.key"
  p = _cli("--dataset=mnist5k", f"--out={out}", f"--key={key}")
  assert p.returncode != 0
  assert "Traceback" not in p.stderr
  last = p.stderr.strip().splitlines()[-1]
  assert last == f"key file --key={key} does not exist; pass --new_key to create a fresh one"
  assert not out.exists() and not key.exists()
  assert os.listdir(tmp_path) == []


def test_cli_bad_dataset_and_missing_data_dir(tmp_path):
  out, key = tmp_path / "x.sealed", tmp_path / "k"
  p = _cli("--dataset=cifar10", f"--out={out}", f"--key={key}", "--new_key")
  assert p.returncode != 0 and "Traceback" not in p.stderr
  assert p.stderr.strip().splitlines()[-1].startswith("--dataset=cifar10 reads local files")
  p = _cli("--dataset=cifar10", f"--data_dir={tmp_path / 'nope'}", f"--out={out}",
           f"--key={key}", "--new_key")
  assert p.returncode != 0 and "Traceback" not in p.stderr and "nope" in p.stderr
  assert os.listdir(tmp_path) == []  # Neither a container nor an unused key.

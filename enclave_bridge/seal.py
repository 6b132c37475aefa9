r"""Sealed (AES-256-GCM) data-set containers (DESIGN sections 2 and 6).

The untrusted side of the system never holds plaintext samples: a data set is
*sealed* once with :func:`seal_dataset` (or the command line below) into a
single encrypted file, and only the enclave process, which holds the key,
opens it with :func:`unseal_dataset`.

Command line::

  python -m enclave_bridge.seal --dataset=mnist5k [--data_dir=DIR] \
      --out=FILE --key=KEYFILE [--new_key] [--shard=i/n]

``--shard=i/n`` seals only shard ``i`` of ``n`` of both splits (every
``n``-th example from the ``i``-th on, :func:`asymml_jax.data.shard_dataset`):
the data of host ``i`` of a multi-host run (DESIGN section 10), recorded in
the header as ``"shard": {"count": n, "index": i}``.  ``--new_key`` creates ``KEYFILE`` (32 random bytes, mode 0600) when it does
not exist; without it the key file must already exist.  An existing key file
is never replaced.  The public header of the new container is printed as JSON.

Container format, version 1 (all integers big-endian)::

  offset       size  field
  0            8     magic b"ASYMSEAL"
  8            1     format version (1)
  9            4     header length L, 1 <= L <= 1 MiB
  13           L     header: canonical JSON (sorted keys, no spaces, ASCII)
  13 + L       12    nonce, random per container
  25 + L       P+16  AES-256-GCM ciphertext of the P-byte payload, then the
                     16-byte tag

The associated data of the AEAD is every byte before the nonce (magic,
version, header length and header), so the public header is authenticated as
strongly as the payload.  The header holds only metadata::

  {"arrays": [{"dtype": "<f4", "name": "train_images", "shape": [N, H, W, C]},
              {"dtype": "<i4", "name": "train_labels", "shape": [N]},
              {"dtype": "<f4", "name": "test_images", "shape": [M, H, W, C]},
              {"dtype": "<i4", "name": "test_labels", "shape": [M]}],
   "cipher": "AES-256-GCM", "created": "2024-01-31T12:00:00Z",
   "format": "ASYMSEAL", "format_version": 1, "name": "mnist5k",
   "num_classes": 10, "payload_bytes": P}

plus, for a shard of a data set, ``"shard": {"count": n, "index": i}``.

The payload is the raw little-endian bytes of the four arrays (C order),
concatenated in exactly the order of ``arrays``; ``P`` is the sum of their
sizes.  Nothing is pickled: arrays are rebuilt with ``np.frombuffer`` and
``reshape`` from the recorded dtypes and shapes, then validated (consistent
shapes, labels in ``[0, num_classes)``, finite images).

What the container protects against:

* Reading the samples or labels without the key: the untrusted host, its
  disks, the driver process and the shared memory see only ciphertext.
* Any modification of the file: a flipped bit anywhere in the header, nonce,
  ciphertext or tag, or a wrong key, fails the GCM tag check and raises
  :class:`WrongKeyOrTampered`; truncation, trailing bytes, a foreign file, an
  unknown version or an absurd header length raise
  :class:`MalformedContainer`.  Decryption is all-or-nothing: no array, not
  even a partial one, is produced unless the tag verifies.
* Relabelling: the header (name, shapes, number of classes) cannot be edited
  without detection.

What it does not protect against:

* Metadata: the header and the file size are public by design (data-set
  name, number of train/test examples, image shape, number of classes,
  creation time).  :func:`read_header` parses it without the key and
  therefore without authenticating it.
* Key theft: the key file is 32 raw bytes in the clear; whoever can read it
  can decrypt every container sealed with it (and forge new ones: AES-GCM is
  symmetric, not a signature).  Under Gramine it must be a protected file of
  the enclave; in the plain-process stand-in its file mode (0600) is the only
  protection.
* Rollback and substitution: an older or a different container sealed with
  the *same* key verifies just as well; the enclave should check the header
  (name, shapes) against what it expects.  There is no freshness counter.
* Anything after decryption: in the plain-process stand-in the plaintext
  lives in ordinary process memory; side channels of the enclave are out of
  scope; deleting or corrupting the file (denial of service) is detected but
  not prevented.
* Nonce reuse is avoided with random 96-bit nonces, which is safe for far
  more than the number of containers one key will ever seal (up to ~2^32).

Limits: one AES-GCM message in the ``cryptography`` package holds at most
2 GiB - 1 bytes, so the payload is limited to ``MAX_PAYLOAD_BYTES`` (CIFAR-10
as float32 is about 0.74 GB).  Sealing and unsealing each hold about two
copies of the payload in memory.

Every file (key or container) is written to a temporary file in the target
directory, fsynced and moved into place with ``os.replace``, so a crash
never leaves a half-written file under the final name.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
from typing import Any, Iterable, Sequence

import numpy as np
from absl import app
from absl import flags
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from asymml_jax.data import DATASET_NAMES, Dataset, load_dataset, shard_dataset

MAGIC = b"ASYMSEAL"
FORMAT_VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_HEADER_BYTES = 1 << 20
# cryptography's AESGCM refuses inputs above 2**31 - 1 bytes; the ciphertext
# handed to decrypt() carries the tag as well.
MAX_PAYLOAD_BYTES = 2**31 - 1 - TAG_BYTES
CIPHER = "AES-256-GCM"

_LENGTH_BYTES = 4
_PREFIX_BYTES = len(MAGIC) + 1 + _LENGTH_BYTES
# (field, little-endian dtype, ndim), in payload order.
_ARRAYS = (
    ("train_images", "<f4", 4),
    ("train_labels", "<i4", 1),
    ("test_images", "<f4", 4),
    ("test_labels", "<i4", 1),
)


class SealError(Exception):
  """Base class of every error about keys and sealed containers."""


class WrongKeyOrTampered(SealError):
  """The GCM tag did not verify: wrong key, or the file was modified."""


class MalformedContainer(SealError):
  """Not a (complete, supported, valid) sealed container."""


class KeyFileError(SealError):
  """A key file is missing, unreadable, of the wrong size, or would be replaced."""


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------


def _fsync_directory(directory: str) -> None:
  """Best-effort fsync of a directory so a rename survives a crash."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _atomic_write(path: str, chunks: Iterable[bytes | memoryview], *, mode: int,
                  overwrite: bool) -> None:
  """Writes ``chunks`` to ``path`` through a temporary file in the same directory.

  Args:
    path: final file name.
    chunks: the bytes to write, in order.
    mode: permission bits of the final file.
    overwrite: if False, an existing ``path`` is never replaced (race-free
      with ``os.link`` where the file system supports hard links).

  Raises:
    FileExistsError: ``path`` exists and ``overwrite`` is False.
    OSError: the file could not be written.
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      os.fchmod(f.fileno(), mode)
      for chunk in chunks:
        f.write(chunk)
      f.flush()
      os.fsync(f.fileno())
    if overwrite:
      os.replace(tmp, path)
    else:
      try:
        os.link(tmp, path)  # Atomic and refuses an existing target.
      except FileExistsError:
        raise
      except OSError:  # No hard links here: check, then rename.
        if os.path.lexists(path):
          raise FileExistsError(path) from None
        os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.remove(tmp)
  _fsync_directory(directory)


def generate_key_file(path: str, *, overwrite: bool = False, key: bytes | None = None) -> None:
  """Writes a fresh random AES-256 key (32 raw bytes) to ``path``, mode 0600.

  The key is written atomically (temporary file, fsync, rename).

  Args:
    path: the key file to create.
    overwrite: replace an existing file.  Off by default because every
      container sealed with the old key becomes unreadable.
    key: these 32 bytes instead of random ones: only for data that is not
      secret (a verification batch, whose enclave must repeat its draws).

  Raises:
    KeyFileError: ``path`` exists (and ``overwrite`` is False), is a
      directory, its directory does not exist, or it cannot be written.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise KeyFileError(f"cannot create key file {path}: directory {directory} does not exist")
  if os.path.isdir(path):
    raise KeyFileError(f"cannot create key file {path}: it is a directory")
  exists_message = (f"key file {path} already exists; refusing to replace it (containers "
                    "sealed with it would become unreadable)")
  if os.path.lexists(path) and not overwrite:
    raise KeyFileError(exists_message)
  if key is None:
    key = AESGCM.generate_key(bit_length=8 * KEY_BYTES)
  elif len(key) != KEY_BYTES:
    raise KeyFileError(f"a key has {KEY_BYTES} bytes, got {len(key)}")
  try:
    _atomic_write(path, [key], mode=0o600, overwrite=overwrite)
  except FileExistsError:
    raise KeyFileError(exists_message) from None
  except OSError as e:
    raise KeyFileError(f"cannot write key file {path}: {e.strerror or e}") from None


def read_key_file(path: str) -> bytes:
  """Reads a key file written by :func:`generate_key_file`.

  Args:
    path: the key file.

  Returns:
    The 32-byte AES-256 key.

  Raises:
    KeyFileError: the file is missing, unreadable, or not exactly 32 bytes.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      key = f.read(KEY_BYTES + 1)
  except FileNotFoundError:
    raise KeyFileError(f"key file {path} does not exist (create one with "
                       "generate_key_file or `python -m enclave_bridge.seal ... "
                       "--new_key`)") from None
  except IsADirectoryError:
    raise KeyFileError(f"key file {path} is a directory, not a key file") from None
  except OSError as e:
    raise KeyFileError(f"cannot read key file {path}: {e.strerror or e}") from None
  if len(key) != KEY_BYTES:
    size = f"more than {KEY_BYTES}" if len(key) > KEY_BYTES else str(len(key))
    raise KeyFileError(f"key file {path} holds {size} bytes; an AES-256 key file holds "
                       f"exactly {KEY_BYTES} raw bytes")
  return key


# ----------------------------------------------------------------------------
# Header and arrays
# ----------------------------------------------------------------------------


def _canonical_json(obj: Any) -> bytes:
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                    allow_nan=False).encode("ascii")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  out = dict(pairs)
  if len(out) != len(pairs):
    raise ValueError("duplicate keys in header")
  return out


def _reject_constant(name: str) -> Any:
  raise ValueError(f"{name} is not allowed in the header")


def _parse_header(header_bytes: bytes, path: str) -> dict[str, Any]:
  """Decodes and validates a header; does *not* authenticate it.

  Raises:
    MalformedContainer: not the JSON object of a version-1 header, or one
      whose ``payload_bytes`` disagrees with its array shapes.
  """
  try:
    header = json.loads(bytes(header_bytes).decode("ascii"),
                        object_pairs_hook=_no_duplicate_keys,
                        parse_constant=_reject_constant)
  except (UnicodeDecodeError, ValueError) as e:
    raise MalformedContainer(f"{path}: the header is not valid JSON ({e})") from None

  def bad(what: str) -> MalformedContainer:
    return MalformedContainer(f"{path}: invalid header: {what}")

  if not isinstance(header, dict):
    raise bad("not a JSON object")
  if header.get("format") != MAGIC.decode() or header.get("format_version") != FORMAT_VERSION:
    raise bad(f"format {header.get('format')!r} version {header.get('format_version')!r}, "
              f"expected {MAGIC.decode()!r} version {FORMAT_VERSION}")
  if header.get("cipher") != CIPHER:
    raise bad(f"cipher {header.get('cipher')!r}, expected {CIPHER!r}")
  if not isinstance(header.get("name"), str):
    raise bad("'name' must be a string")
  if not isinstance(header.get("created"), str):
    raise bad("'created' must be a string")
  num_classes = header.get("num_classes")
  if not _is_int(num_classes) or not 1 <= num_classes <= np.iinfo(np.int32).max:
    raise bad(f"'num_classes' must be a positive integer, got {num_classes!r}")
  arrays = header.get("arrays")
  if not isinstance(arrays, list) or len(arrays) != len(_ARRAYS):
    raise bad(f"'arrays' must list {len(_ARRAYS)} arrays")
  total = 0
  for entry, (name, dtype, ndim) in zip(arrays, _ARRAYS):
    if not isinstance(entry, dict) or entry.get("name") != name:
      raise bad(f"expected array {name!r} here, got {entry!r:.80}")
    if entry.get("dtype") != dtype:
      raise bad(f"{name}: dtype {entry.get('dtype')!r}, expected {dtype!r}")
    shape = entry.get("shape")
    if (not isinstance(shape, list) or len(shape) != ndim
        or not all(_is_int(d) and 0 <= d <= MAX_PAYLOAD_BYTES for d in shape)):
      raise bad(f"{name}: shape must be {ndim} non-negative integers, got {shape!r:.80}")
    total += int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
  if "shard" in header:
    shard = header["shard"]
    if (not isinstance(shard, dict) or set(shard) != {"count", "index"}
        or not all(_is_int(shard[k]) for k in ("count", "index"))
        or not 0 <= shard["index"] < shard["count"]):
      raise bad(f"'shard' must be {{'count': n, 'index': i}} with 0 <= i < n, "
                f"got {shard!r:.80}")
  payload_bytes = header.get("payload_bytes")
  if not _is_int(payload_bytes) or payload_bytes != total:
    raise bad(f"'payload_bytes' is {payload_bytes!r} but the arrays need {total} bytes")
  if total > MAX_PAYLOAD_BYTES:
    raise bad(f"payload of {total} bytes exceeds the limit of {MAX_PAYLOAD_BYTES}")
  return header


def _check_arrays(arrays: dict[str, np.ndarray], num_classes: int) -> None:
  """Shape, range and finiteness checks shared by sealing and unsealing.

  Raises:
    ValueError: the first problem found.
  """
  if not _is_int(num_classes) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.ndim != 4:
      raise ValueError(f"{split}_images must be (N, H, W, C), got shape {images.shape}")
    if labels.shape != (images.shape[0],):
      raise ValueError(f"{split}_labels shape {labels.shape} does not match "
                       f"{images.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(f"{split}_labels out of range [0, {num_classes}): min {labels.min()}, "
                       f"max {labels.max()}")
    if not np.isfinite(images).all():
      raise ValueError(f"{split}_images contain NaN or Inf")
  if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
    raise ValueError(f"train image shape {arrays['train_images'].shape[1:]} != test image "
                     f"shape {arrays['test_images'].shape[1:]}")


def _dataset_arrays(ds: Dataset) -> dict[str, np.ndarray]:
  """The four arrays of ``ds``, checked and in their container dtypes."""
  arrays = {}
  for name, dtype, _ in _ARRAYS:
    array = np.asarray(getattr(ds, name))
    if name.endswith("_images"):
      if array.dtype != np.float32:
        raise ValueError(f"{ds.name}: {name} must be float32, got {array.dtype}")
    elif not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f"{ds.name}: {name} must be integers, got {array.dtype}")
    arrays[name] = array
  num_classes = ds.num_classes
  if isinstance(num_classes, np.integer):
    num_classes = int(num_classes)
  try:
    _check_arrays(arrays, num_classes)
  except ValueError as e:
    raise ValueError(f"{ds.name}: cannot seal an invalid data set: {e}") from None
  if num_classes > np.iinfo(np.int32).max:
    raise ValueError(f"{ds.name}: num_classes {num_classes} does not fit int32 labels")
  return {name: arrays[name].astype(dtype, copy=False) for name, dtype, _ in _ARRAYS}


# ----------------------------------------------------------------------------
# Sealing
# ----------------------------------------------------------------------------


def seal_dataset(ds: Dataset, out_path: str, key_path: str, *,
                 shard: tuple[int, int] | None = None) -> dict:
  """Encrypts a data set into a sealed container (format in the module docstring).

  Args:
    ds: the data set; float32 images, integer labels in ``[0, num_classes)``,
      finite images.
    out_path: the container to write (atomically; an existing file is
      replaced).
    key_path: a key file from :func:`generate_key_file`.
    shard: ``(i, n)`` when ``ds`` is shard ``i`` of ``n`` of a data set
      (recorded in the header; :func:`seal_shard` makes and seals one).

  Returns:
    The public header (what :func:`read_header` returns for the new file).

  Raises:
    KeyFileError: bad key file.
    ValueError: an invalid data set, a payload above ``MAX_PAYLOAD_BYTES``, or
      ``out_path`` naming the key file itself.
    OSError: the container could not be written.
  """
  out_path, key_path = os.fspath(out_path), os.fspath(key_path)
  key = read_key_file(key_path)
  if os.path.realpath(out_path) == os.path.realpath(key_path):
    raise ValueError(f"refusing to write the container over its own key file {key_path}")
  if shard is not None:
    i, n = (int(v) for v in shard)
    if not 0 <= i < n:
      raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
  arrays = _dataset_arrays(ds)
  sizes = [a.nbytes for a in arrays.values()]
  total = sum(sizes)
  if total > MAX_PAYLOAD_BYTES:
    raise ValueError(f"{ds.name}: payload of {total} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte "
                     "limit of one AES-GCM message (format version 1)")
  header = {
      "arrays": [{"dtype": dtype, "name": name, "shape": [int(d) for d in arrays[name].shape]}
                 for name, dtype, _ in _ARRAYS],
      "cipher": CIPHER,
      "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
      "format": MAGIC.decode(),
      "format_version": FORMAT_VERSION,
      "name": str(ds.name),
      "num_classes": int(ds.num_classes),
      "payload_bytes": total,
  }
  if shard is not None:
    header["shard"] = {"count": n, "index": i}
  header_bytes = _canonical_json(header)
  if len(header_bytes) > MAX_HEADER_BYTES:
    raise ValueError(f"header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES} "
                     "(is the data-set name absurdly long?)")
  prefix = MAGIC + bytes([FORMAT_VERSION]) + len(header_bytes).to_bytes(_LENGTH_BYTES, "big")
  aad = prefix + header_bytes

  payload = bytearray(total)
  offset = 0
  for (name, dtype, _), size in zip(_ARRAYS, sizes):
    view = np.frombuffer(payload, dtype=dtype, count=arrays[name].size, offset=offset)
    np.copyto(view.reshape(arrays[name].shape), arrays[name])
    offset += size
  nonce = os.urandom(NONCE_BYTES)
  sealed = AESGCM(key).encrypt(nonce, memoryview(payload), aad)
  del payload

  _atomic_write(out_path, [aad, nonce, sealed], mode=0o600, overwrite=True)
  return _parse_header(header_bytes, out_path)


def seal_shard(ds: Dataset, index: int, count: int, out_path: str, key_path: str) -> dict:
  """Seals shard ``index`` of ``count`` of ``ds`` (DESIGN section 10).

  The shard is :func:`asymml_jax.data.shard_dataset` of both splits: the
  data one host's enclave trains on (and evaluates) in a multi-host run.

  Returns:
    The public header (with ``"shard": {"count": count, "index": index}``).
  """
  return seal_dataset(shard_dataset(ds, index, count), out_path, key_path,
                      shard=(index, count))


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def is_sealed(path: str) -> bool:
  """Whether ``path`` is a readable file that starts with the container magic.

  Only the magic is checked (not the version or the integrity): a True answer
  means "treat this as a container"; :func:`unseal_dataset` then says
  precisely what, if anything, is wrong with it.
  """
  try:
    with open(os.fspath(path), "rb") as f:
      return f.read(len(MAGIC)) == MAGIC
  except OSError:
    return False


def _read_container(path: str) -> tuple[bytes, int, memoryview, memoryview, memoryview]:
  """Reads a container and splits it at the framing of the format.

  Returns:
    ``(blob, aad_len, header_bytes, nonce, ciphertext_and_tag)``: the whole
    file and zero-copy views into it.

  Raises:
    FileNotFoundError: no such file.
    MalformedContainer: bad magic, unsupported version, header length out of
      range, or a file too short for its header length.
  """
  try:
    size = os.path.getsize(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"sealed container {path} does not exist") from None
  max_size = _PREFIX_BYTES + MAX_HEADER_BYTES + NONCE_BYTES + MAX_PAYLOAD_BYTES + TAG_BYTES
  if size > max_size:
    raise MalformedContainer(f"{path}: {size} bytes is larger than any sealed container "
                             f"({max_size} bytes at most)")
  with open(path, "rb") as f:
    blob = f.read()
  if len(blob) < _PREFIX_BYTES:
    if not MAGIC.startswith(blob[:len(MAGIC)]):
      raise MalformedContainer(f"{path}: not a sealed container (bad magic)")
    raise MalformedContainer(f"{path}: truncated ({len(blob)} bytes, shorter than the "
                             f"{_PREFIX_BYTES}-byte prefix)")
  if blob[:len(MAGIC)] != MAGIC:
    raise MalformedContainer(f"{path}: not a sealed container (bad magic "
                             f"{blob[:len(MAGIC)]!r}, expected {MAGIC!r})")
  version = blob[len(MAGIC)]
  if version != FORMAT_VERSION:
    raise MalformedContainer(f"{path}: unsupported container format version {version} "
                             f"(this reader supports version {FORMAT_VERSION})")
  header_len = int.from_bytes(blob[len(MAGIC) + 1:_PREFIX_BYTES], "big")
  if not 1 <= header_len <= MAX_HEADER_BYTES:
    raise MalformedContainer(f"{path}: header length {header_len} out of range "
                             f"[1, {MAX_HEADER_BYTES}]")
  aad_len = _PREFIX_BYTES + header_len
  if len(blob) < aad_len + NONCE_BYTES + TAG_BYTES:
    raise MalformedContainer(f"{path}: truncated ({len(blob)} bytes; the header, nonce and "
                             f"tag alone need {aad_len + NONCE_BYTES + TAG_BYTES})")
  view = memoryview(blob)
  return (blob, aad_len, view[_PREFIX_BYTES:aad_len], view[aad_len:aad_len + NONCE_BYTES],
          view[aad_len + NONCE_BYTES:])


def _check_length(header: dict[str, Any], ciphertext: memoryview, path: str) -> None:
  expected = header["payload_bytes"] + TAG_BYTES
  if len(ciphertext) < expected:
    raise MalformedContainer(f"{path}: truncated (ciphertext and tag are {len(ciphertext)} "
                             f"bytes, the header declares {expected})")
  if len(ciphertext) > expected:
    raise MalformedContainer(f"{path}: {len(ciphertext) - expected} unexpected trailing "
                             "bytes after the ciphertext")


def read_header(path: str) -> dict:
  """The public metadata of a container; no key needed.

  Without the key the header cannot be authenticated: this is for display and
  planning only.  :func:`unseal_dataset` authenticates it.

  Args:
    path: a sealed container.

  Returns:
    The header: ``format``, ``format_version``, ``cipher``, ``name``,
    ``num_classes``, ``created``, ``payload_bytes`` and ``arrays`` (name,
    dtype and shape of each array).  No sample values.

  Raises:
    FileNotFoundError: no such file.
    MalformedContainer: not a complete, supported container.
  """
  path = os.fspath(path)
  _, _, header_bytes, _, ciphertext = _read_container(path)
  header = _parse_header(header_bytes, path)
  _check_length(header, ciphertext, path)
  return header


def unseal_dataset(path: str, key_path: str) -> Dataset:
  """Verifies and decrypts a sealed container.

  All or nothing: the GCM tag over the header and ciphertext is checked
  before a single array is built.

  Args:
    path: the container written by :func:`seal_dataset`.
    key_path: its key file.

  Returns:
    The :class:`~asymml_jax.data.Dataset` (float32 images, int32 labels; the
    arrays are read-only views of the decrypted payload, like the cached
    data sets of ``asymml_jax.data``).

  Raises:
    KeyFileError: bad key file.
    FileNotFoundError: no such container.
    WrongKeyOrTampered: the tag did not verify.
    MalformedContainer: not a complete, supported container, or one whose
      authenticated content is invalid.
  """
  path = os.fspath(path)
  key = read_key_file(key_path)
  blob, aad_len, header_bytes, nonce, ciphertext = _read_container(path)
  # Length diagnostics from the unauthenticated header.  A header that does not
  # parse here is left to the tag check: a flipped byte must read as tampering.
  try:
    claimed = _parse_header(header_bytes, path)
  except MalformedContainer:
    claimed = None
  if claimed is not None:
    _check_length(claimed, ciphertext, path)
  try:
    payload = AESGCM(key).decrypt(nonce, ciphertext, memoryview(blob)[:aad_len])
  except InvalidTag:
    raise WrongKeyOrTampered(f"wrong key or tampered file: {path}") from None
  header = _parse_header(header_bytes, path)
  if len(payload) != header["payload_bytes"]:  # Unreachable after _check_length.
    raise MalformedContainer(f"{path}: payload is {len(payload)} bytes, the header declares "
                             f"{header['payload_bytes']}")
  arrays = {}
  offset = 0
  for entry in header["arrays"]:
    dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    array = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape)
    native = np.float32 if dtype.kind == "f" else np.int32
    arrays[entry["name"]] = array.astype(native, copy=False)
    offset += count * dtype.itemsize
  try:
    _check_arrays(arrays, header["num_classes"])
    return Dataset(name=header["name"], num_classes=header["num_classes"], **arrays)
  except ValueError as e:
    raise MalformedContainer(f"{path}: the decrypted data set is invalid: {e}") from None


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

_USAGE = """Seals a data set into an AES-256-GCM container for the enclave.

Usage:

  python -m enclave_bridge.seal --dataset=mnist5k [--data_dir=DIR] \\
      --out=FILE --key=KEYFILE [--new_key] [--shard=i/n]

--shard=i/n seals shard i of n (one host of a multi-host run).
The container format and threat model are documented in enclave_bridge/seal.py.
"""


def _define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the command-line flags.

  Only called when the module runs as a script, so that importing it (the
  enclave host does, for :func:`unseal_dataset`) never claims flag names.
  """
  flags.DEFINE_string("dataset", None,
                      f"Data set to seal, one of: {', '.join(DATASET_NAMES)}.",
                      flag_values=flag_values)
  flags.DEFINE_string("data_dir", None,
                      "Data directory (cifar10, cifar100, image_folder; mnist5k ignores it).",
                      flag_values=flag_values)
  flags.DEFINE_string("out", None, "Path of the sealed container to write.",
                      flag_values=flag_values)
  flags.DEFINE_string("key", None, "Key file (32 raw bytes).", flag_values=flag_values)
  flags.DEFINE_boolean("new_key", False,
                       "Create --key with a fresh random key; refused if it already exists.",
                       flag_values=flag_values)
  flags.DEFINE_string("shard", None,
                      "i/n: seal only shard i of n (every n-th example from the i-th; "
                      "the data of host i of a multi-host run).", flag_values=flag_values)
  flags.mark_flags_as_required(["dataset", "out", "key"], flag_values=flag_values)


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str]) -> None:
  """absl entry point: loads, seals and prints the header (flags: see ``_define_flags``)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  values = flags.FLAGS
  name, data_dir = values.dataset, values.data_dir or None
  out, key, new_key = values.out, values.key, values.new_key
  shard = None
  if values.shard:
    from asymml_jax.distributed import parse_shard
    try:
      shard = parse_shard(values.shard)
    except ValueError as e:
      raise app.UsageError(f"--shard: {e}") from None

  if os.path.lexists(key):
    if new_key:
      raise app.UsageError(f"--key={key} already exists and --new_key would replace it "
                           "(containers sealed with it would become unreadable); drop "
                           "--new_key to seal with the existing key")
    try:
      read_key_file(key)
    except KeyFileError as e:
      raise app.UsageError(_one_line(e)) from None
  elif not new_key:
    raise app.UsageError(f"key file --key={key} does not exist; pass --new_key to create a "
                         "fresh one")
  elif not os.path.isdir(os.path.dirname(os.path.abspath(key))):
    raise app.UsageError(f"cannot create --key={key}: its directory does not exist")
  if os.path.realpath(out) == os.path.realpath(key):
    raise app.UsageError(f"--out and --key name the same file ({out})")
  if os.path.isdir(out):
    raise app.UsageError(f"--out={out} is a directory")
  if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    raise app.UsageError(f"cannot write --out={out}: its directory does not exist")

  if str(name).strip().lower() in set(DATASET_NAMES) - {"mnist5k"} and not data_dir:
    raise app.UsageError(f"--dataset={name} reads local files: --data_dir is required "
                         "(nothing is downloaded)")
  try:
    ds = load_dataset(name, data_dir)
    if shard is not None:
      ds = shard_dataset(ds, *shard)
  except (ValueError, OSError) as e:
    raise app.UsageError(_one_line(e)) from None
  try:
    if new_key:
      generate_key_file(key)
    try:
      header = seal_dataset(ds, out, key, shard=shard)
    except BaseException:
      if new_key:  # Do not leave behind a key that sealed nothing.
        os.remove(key)
      raise
  except (SealError, ValueError, OSError) as e:
    raise app.UsageError(_one_line(e)) from None
  print(json.dumps(header, indent=2, sort_keys=True))
  sys.stdout.flush()


if __name__ == "__main__":
  # absl prints __main__.__doc__ with usage errors and --help: show the usage,
  # not the whole format specification above.
  __doc__ = _USAGE
  _define_flags()
  app.run(main)

"""Message schema, framing and validation of the enclave bridge (DESIGN section 6).

A frame on the control socket is ``u32 length`` followed by:

====================  =====================================================
header (36 bytes)     ``!4sHHQqiII``: magic ``b"AEB1"``, version, op, seq,
                      tag (step; negative for eval batches), stage,
                      tensor count, metadata length
metadata              UTF-8 JSON object (small: config, errors, timings)
descriptors           per tensor: ``u16`` name length, name, ``u8`` class
                      length, class, ``u8`` dtype code, ``u8`` ndim,
                      ``u32 * ndim`` shape, ``u64`` offset, ``u64`` nbytes
====================  =====================================================

Tensor payloads never travel in the frame: they live in the shared-memory
arena at ``offset`` (see ``transport.py``).  Nothing is unpickled; every field
is bounds-checked while parsing, and every violation raises a typed
:class:`ProtocolError` whose ``code`` travels back in an ``ERROR`` reply, so
the untrusted side sees the same typed error the enclave raised.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import struct
from typing import Any, NamedTuple

import numpy as np

MAGIC = b"AEB1"
VERSION = 1
HEADER = struct.Struct("!4sHHQqiII")
LENGTH = struct.Struct("!I")
MAX_FRAME = 1 << 20          # bytes of one control frame (metadata + descriptors)
MAX_TENSORS = 4096
MAX_NDIM = 8
MAX_NAME = 512
MAX_META = 256 * 1024


class Op(enum.IntEnum):
  HELLO = 1        # config in metadata; the enclave builds model, plan, executor
  BEGIN = 2        # start a step (train) or an eval batch; the enclave samples it
  FORWARD = 3      # trusted stage forward
  BACKWARD = 4     # trusted stage backward
  END = 5          # drop a step's state
  WHOLE_STEP = 6   # tee_only: the whole model in the enclave
  STATS = 7        # timing and traffic counters
  SHUTDOWN = 8
  REPLY = 64
  ERROR = 65


REQUEST_OPS = frozenset(op for op in Op if op < Op.REPLY)

# float64: verification only (asymml_jax.precision); HELLO fixes the run's dtype.
DTYPES: dict[int, np.dtype] = {1: np.dtype(np.float32), 2: np.dtype(np.int32),
                               3: np.dtype(np.float16), 5: np.dtype(np.float64)}
try:  # bfloat16 residuals (ml_dtypes ships with jax)
  import ml_dtypes
  DTYPES[4] = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
  pass
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


class ProtocolError(Exception):
  """A message the bridge refuses; ``code`` identifies the kind across the boundary."""

  code = "protocol"


class MalformedFrame(ProtocolError):
  code = "malformed"


class UnsupportedVersion(ProtocolError):
  code = "version"


class OversizedFrame(ProtocolError):
  code = "oversized"


class OutOfOrder(ProtocolError):
  """A sequence number that is not the next one: replayed, reordered or skipped."""

  code = "out_of_order"


class UnknownOp(ProtocolError):
  code = "unknown_op"


class UndeclaredTensor(ProtocolError):
  """A tensor class the ledger does not declare for this direction, or an unexpected name."""

  code = "undeclared"


class ShapeMismatch(ProtocolError):
  code = "shape"


class DtypeMismatch(ProtocolError):
  code = "dtype"


class NonFinite(ProtocolError):
  code = "non_finite"


class OutOfBounds(ProtocolError):
  code = "out_of_bounds"


class StateError(ProtocolError):
  """A well-formed request the enclave cannot serve now (wrong order, unknown step)."""

  code = "state"


class EnclaveFailure(ProtocolError):
  """An unexpected failure inside the enclave (its message, never private data)."""

  code = "enclave"


class IntegrityViolation(ProtocolError):
  """The accelerator's result failed the enclave's Freivalds check (``verify_untrusted``).

  The enclave's :class:`asymml_jax.integrity.IntegrityError`, carried across:
  a wrong or tampered ``conv(R, W)`` (forward) or residual gradient (backward).
  """

  code = "integrity"


class AuthenticationFailed(ProtocolError):
  """A HELLO, or its reply, that does not prove knowledge of the launch secret (``auth.py``)."""

  code = "auth"


ERRORS: dict[str, type[ProtocolError]] = {
    c.code: c for c in (ProtocolError, MalformedFrame, UnsupportedVersion, OversizedFrame,
                        OutOfOrder, UnknownOp, UndeclaredTensor, ShapeMismatch,
                        DtypeMismatch, NonFinite, OutOfBounds, StateError, EnclaveFailure,
                        IntegrityViolation, AuthenticationFailed)}


class TensorDesc(NamedTuple):
  """Where one tensor lies in the arena, and what it claims to be (immutable;
  a named tuple: built ~30 times per call on the critical path)."""

  name: str
  cls: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int
  nbytes: int


@dataclasses.dataclass(frozen=True)
class Message:
  op: Op
  seq: int
  tag: int
  stage: int
  meta: dict[str, Any]
  tensors: tuple[TensorDesc, ...]


def encode(msg: Message) -> bytes:
  """Serialises a message to a frame body (without the length prefix)."""
  meta = json.dumps(msg.meta, separators=(",", ":"), sort_keys=True).encode()
  parts = [HEADER.pack(MAGIC, VERSION, int(msg.op), msg.seq, msg.tag, msg.stage,
                       len(msg.tensors), len(meta)), meta]
  for t in msg.tensors:
    name, cls = t.name.encode(), t.cls.encode()
    parts.append(struct.pack("!H", len(name)) + name + struct.pack("!B", len(cls)) + cls)
    parts.append(struct.pack("!BB", DTYPE_CODES[np.dtype(t.dtype)], len(t.shape)))
    parts.append(struct.pack(f"!{len(t.shape)}I", *t.shape))
    parts.append(struct.pack("!QQ", t.offset, t.nbytes))
  body = b"".join(parts)
  if len(body) > MAX_FRAME:
    raise OversizedFrame(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
  return body


_STRUCTS: dict[str, struct.Struct] = {}


def _struct(fmt: str) -> struct.Struct:
  st = _STRUCTS.get(fmt)
  if st is None:
    st = _STRUCTS[fmt] = struct.Struct(fmt)
  return st


class _Reader:
  """Bounds-checked reads from a frame body (compiled formats cached: a FORWARD
  request has ~30 descriptors and its decode is on every call's critical path)."""

  def __init__(self, data: bytes):
    self.data, self.pos = data, 0

  def _need(self, n: int) -> None:
    if n < 0 or self.pos + n > len(self.data):
      raise MalformedFrame(f"truncated frame: need {n} bytes at {self.pos}, have "
                           f"{len(self.data) - self.pos}")

  def take(self, n: int) -> bytes:
    self._need(n)
    out = self.data[self.pos:self.pos + n]
    self.pos += n
    return out

  def unpack(self, fmt: str):
    s = _struct(fmt)
    self._need(s.size)
    out = s.unpack_from(self.data, self.pos)
    self.pos += s.size
    return out


def decode(body: bytes) -> Message:
  """Parses and bounds-checks a frame body; raises a :class:`ProtocolError`."""
  if not isinstance(body, (bytes, bytearray, memoryview)):
    raise MalformedFrame("frame is not bytes")
  body = bytes(body)
  if len(body) > MAX_FRAME:
    raise OversizedFrame(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
  r = _Reader(body)
  magic, version, op, seq, tag, stage, n_tensors, meta_len = r.unpack(HEADER.format)
  if magic != MAGIC:
    raise MalformedFrame(f"bad magic {magic!r}")
  if version != VERSION:
    raise UnsupportedVersion(f"protocol version {version}, this enclave speaks {VERSION}")
  try:
    op = Op(op)
  except ValueError:
    raise UnknownOp(f"unknown operation {op}") from None
  if n_tensors > MAX_TENSORS:
    raise OversizedFrame(f"{n_tensors} tensors exceed {MAX_TENSORS}")
  if meta_len > MAX_META:
    raise OversizedFrame(f"metadata of {meta_len} bytes exceeds {MAX_META}")
  try:
    meta = json.loads(r.take(meta_len).decode("utf-8")) if meta_len else {}
  except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, too deep, huge integers
    raise MalformedFrame(f"metadata is not JSON: {e}") from None
  if not isinstance(meta, dict):
    raise MalformedFrame("metadata must be a JSON object")
  tensors = []
  data, pos, end = body, r.pos, len(body)
  h_, bb_ = _struct("!H"), _struct("!BB")

  def truncated(need: int):
    return MalformedFrame(f"truncated frame: need {need} bytes at {pos}, have {end - pos}")
  for _ in range(n_tensors):  # one descriptor: inlined, on every call's critical path
    if pos + 2 > end:
      raise truncated(2)
    (nlen,) = h_.unpack_from(data, pos)
    pos += 2
    if nlen > MAX_NAME:
      raise MalformedFrame(f"tensor name of {nlen} bytes")
    if pos + nlen + 1 > end:
      raise truncated(nlen + 1)
    name_b = data[pos:pos + nlen]
    clen = data[pos + nlen]
    pos += nlen + 1
    if pos + clen > end:
      raise truncated(clen)
    try:
      name = name_b.decode("utf-8")
      cls = data[pos:pos + clen].decode("ascii")
    except UnicodeDecodeError:
      raise MalformedFrame("tensor name or class is not text") from None
    pos += clen
    if pos + 2 > end:
      raise truncated(2)
    code, ndim = bb_.unpack_from(data, pos)
    pos += 2
    if code not in DTYPES:
      raise DtypeMismatch(f"{name}: unknown dtype code {code}")
    if ndim > MAX_NDIM:
      raise MalformedFrame(f"{name}: {ndim} dimensions")
    tail = _struct(f"!{ndim}IQQ")
    if pos + tail.size > end:
      raise truncated(tail.size)
    *shape, offset, nbytes = tail.unpack_from(data, pos)
    pos += tail.size
    shape = tuple(shape)
    dtype = DTYPES[code]
    if nbytes != math.prod(shape) * dtype.itemsize:
      raise MalformedFrame(f"{name}: {nbytes} bytes for shape {shape} of {dtype}")
    tensors.append(TensorDesc(name, cls, dtype, shape, offset, nbytes))
  r.pos = pos
  if r.pos != len(body):
    raise MalformedFrame(f"{len(body) - r.pos} trailing bytes")
  if len({t.name for t in tensors}) != len(tensors):
    raise MalformedFrame("duplicate tensor names")
  return Message(op=op, seq=seq, tag=tag, stage=stage, meta=meta, tensors=tuple(tensors))


def error_message(seq: int, tag: int, stage: int, err: BaseException) -> Message:
  code = err.code if isinstance(err, ProtocolError) else EnclaveFailure.code
  text = str(err) if isinstance(err, ProtocolError) else f"{type(err).__name__}: {err}"
  return Message(Op.ERROR, seq, tag, stage, {"code": code, "error": text[:4000]}, ())


def raise_error(msg: Message) -> None:
  """Re-raises an ``ERROR`` reply as the typed exception the enclave raised."""
  cls = ERRORS.get(str(msg.meta.get("code")), ProtocolError)
  raise cls(f"enclave refused the request: {msg.meta.get('error', '?')}")


# ----------------------------------------------------------- tree <-> names
def flatten(tree: Any, prefix: str) -> dict[str, Any]:
  """Nested dicts of arrays -> ``{"prefix/a/b": leaf}`` (``None`` subtrees vanish)."""
  out: dict[str, Any] = {}

  def walk(node, path):
    if node is None:
      return
    if isinstance(node, dict):
      for k in sorted(node):
        if "/" in str(k):
          raise ValueError(f"key {k!r} contains '/'")
        walk(node[k], f"{path}/{k}")
    else:
      out[path] = node
  walk(tree, prefix)
  return out


def rebuild(template: Any, prefix: str, values: dict[str, Any]) -> Any:
  """Rebuilds ``template``'s nested-dict structure from ``{"prefix/a/b": leaf}``."""
  if template is None:
    return None
  if isinstance(template, dict):
    return {k: rebuild(v, f"{prefix}/{k}", values) for k, v in template.items()}
  return values[prefix]


def check_against(template: Any, prefix: str, received: dict[str, TensorDesc]) -> None:
  """Refuses unless the tensors under ``prefix`` are exactly ``template``'s leaves.

  Raises:
    UndeclaredTensor: a missing or unexpected name.
    ShapeMismatch / DtypeMismatch: a leaf of the wrong shape or dtype.
  """
  want = flatten(template, prefix)
  got = {n: d for n, d in received.items() if n == prefix or n.startswith(prefix + "/")}
  if set(got) != set(want):
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    raise UndeclaredTensor(f"{prefix}: missing {missing[:5]}, unexpected {extra[:5]}")
  for name, d in got.items():
    w = want[name]
    if tuple(d.shape) != tuple(w.shape):
      raise ShapeMismatch(f"{name}: shape {tuple(d.shape)}, expected {tuple(w.shape)}")
    if np.dtype(d.dtype) != np.dtype(w.dtype):
      raise DtypeMismatch(f"{name}: dtype {np.dtype(d.dtype)}, expected {np.dtype(w.dtype)}")

"""Control socket and shared-memory arena of the enclave bridge (DESIGN section 6).

* :class:`Channel`: a stream socket carrying length-prefixed frames
  (``protocol.py``), with a bounded frame size and timeouts.  The socket is a
  Unix-domain one (``transport="unix"``, a path in a private folder) or TCP
  on the loopback interface only (``transport="tcp"``, an ephemeral port;
  what Gramine needs, since its Unix sockets are invisible to the host).
  Either way HELLO proves the per-launch secret (``auth.py``).
* :class:`Arena`: one POSIX shared-memory block created by the untrusted side
  (it is untrusted memory) and split in two regions: requests (untrusted ->
  enclave) and replies (enclave -> untrusted).  Tensors are written at 64-byte
  aligned offsets and described by ``protocol.TensorDesc``.  The reader copies
  a payload into private memory *before* validating it, so the untrusted side
  cannot change it after the check (no time-of-check/time-of-use window).
"""

from __future__ import annotations

import math
import os
import socket
import time
from multiprocessing import resource_tracker, shared_memory
from typing import Any, Iterable

import numpy as np

from enclave_bridge import protocol as pr

ALIGN = 64
TRANSPORTS = ("unix", "tcp")
LOOPBACK = "127.0.0.1"
_TCP = "tcp://"
#: The line the server prints once it listens; the launcher reads the address from it.
READY_PREFIX = "enclave: ready on "
_CREATED: set[str] = set()  # arenas this process created (and must unlink itself)


class ChannelClosed(ConnectionError):
  """The peer closed the socket (for the untrusted side: the enclave is gone)."""


def tcp_port(address: str) -> int | None:
  """The port of a ``tcp://127.0.0.1:PORT`` address; ``None`` for a Unix path.

  Raises:
    ValueError: a TCP address that is not on the loopback interface.
  """
  if not address.startswith(_TCP):
    return None
  host, _, port = address[len(_TCP):].rpartition(":")
  if host != LOOPBACK or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"the bridge only speaks TCP on {LOOPBACK}: got {address!r}")
  return int(port)


def listen(transport: str, path: str = "") -> tuple[socket.socket, str]:
  """A listening socket for one driver, and the address the driver connects to.

  Args:
    transport: ``"unix"`` (bound to ``path``, mode 0600) or ``"tcp"`` (bound
      to 127.0.0.1 on an ephemeral port; never another interface).
    path: the Unix socket's path.

  Returns:
    ``(listener, address)``: ``path`` or ``"tcp://127.0.0.1:PORT"``.
  """
  if transport == "tcp":
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((LOOPBACK, 0))
    s.listen(1)
    return s, f"{_TCP}{LOOPBACK}:{s.getsockname()[1]}"
  if transport != "unix":
    raise ValueError(f"bridge.transport must be one of {TRANSPORTS}, got {transport!r}")
  if not path:
    raise ValueError("the unix transport needs a socket path")
  if os.path.lexists(path):
    os.unlink(path)
  s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  s.bind(path)
  os.chmod(path, 0o600)
  s.listen(1)
  return s, path


class Channel:
  """Length-prefixed frames over a connected stream socket (Unix or loopback TCP)."""

  def __init__(self, sock: socket.socket):
    self.sock = sock
    if sock.family == socket.AF_INET:  # small frames go out at once
      sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    self.bytes_sent = 0
    self.bytes_received = 0

  @classmethod
  def connect(cls, address: str, timeout: float = 30.0) -> "Channel":
    """Connects to a Unix socket path or a ``tcp://127.0.0.1:PORT`` address."""
    port = tcp_port(address)
    deadline = time.monotonic() + timeout
    while True:
      if port is None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = address
      else:
        s, target = socket.socket(socket.AF_INET, socket.SOCK_STREAM), (LOOPBACK, port)
      try:
        s.connect(target)
        return cls(s)
      except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        if time.monotonic() > deadline:
          raise
        time.sleep(0.05)

  def send(self, body: bytes) -> None:
    if len(body) > pr.MAX_FRAME:
      raise pr.OversizedFrame(f"frame of {len(body)} bytes exceeds {pr.MAX_FRAME}")
    data = pr.LENGTH.pack(len(body)) + body
    self.sock.sendall(data)
    self.bytes_sent += len(data)

  def _recv_exact(self, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
      chunk = self.sock.recv(n - len(buf))
      if not chunk:
        raise ChannelClosed("connection closed by peer")
      buf += chunk
    return bytes(buf)

  def recv(self, timeout: float | None = None) -> bytes:
    """One frame body.  ``socket.timeout`` if nothing arrives within ``timeout``."""
    self.sock.settimeout(timeout)
    head = self._recv_exact(pr.LENGTH.size)
    (n,) = pr.LENGTH.unpack(head)
    if n > pr.MAX_FRAME:
      raise pr.OversizedFrame(f"announced frame of {n} bytes exceeds {pr.MAX_FRAME}")
    self.sock.settimeout(max(timeout or 0, 30.0))  # the body follows at once
    body = self._recv_exact(n)
    self.bytes_received += pr.LENGTH.size + n
    return body

  def close(self) -> None:
    try:
      self.sock.close()
    except OSError:
      pass


class Arena:
  """Shared-memory tensor arena with a request and a reply region."""

  def __init__(self, shm: shared_memory.SharedMemory, region: int, owner: bool):
    self.shm, self.region, self.owner = shm, region, owner
    self.buf = shm.buf
    # float64 crosses only in a float64 (verification) run, set from HELLO's
    # dtype on both sides; otherwise a float64 array (a Python float) goes as float32.
    self.wide_floats = False

  @classmethod
  def create(cls, region_bytes: int) -> "Arena":
    region = int(math.ceil(region_bytes / ALIGN) * ALIGN)
    shm = shared_memory.SharedMemory(create=True, size=2 * region)
    _CREATED.add(shm.name)
    return cls(shm, region, owner=True)

  @classmethod
  def attach(cls, name: str, region_bytes: int) -> "Arena":
    shm = shared_memory.SharedMemory(name=name, create=False)
    # Python < 3.13 registers attached blocks with the resource tracker, which
    # would unlink the creator's block when this process exits.
    if shm.name not in _CREATED:  # (the creator keeps its own registration)
      try:
        resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001
      except Exception:  # pragma: no cover - tracker details vary
        pass
    if shm.size < 2 * region_bytes:
      shm.close()
      raise pr.OutOfBounds(f"arena of {shm.size} bytes is smaller than 2 x {region_bytes}")
    return cls(shm, region_bytes, owner=False)

  @property
  def name(self) -> str:
    return self.shm.name

  def _base(self, side: str) -> int:
    if side == "request":
      return 0
    if side == "reply":
      return self.region
    raise ValueError(side)

  def check_size(self) -> None:
    """Refuses an arena that another process truncated (touching it would be a SIGBUS)."""
    size = os.fstat(self.shm._fd).st_size  # noqa: SLF001 - the segment's own descriptor
    if size < 2 * self.region:
      raise pr.OutOfBounds(
          f"the shared-memory arena {self.name} is {size} bytes, smaller than its "
          f"2 x {self.region}-byte regions (truncated by another process)")

  def write(self, side: str, tensors: Iterable[tuple[str, str, np.ndarray]]
            ) -> tuple[pr.TensorDesc, ...]:
    """Copies ``(name, class, array)`` triples into ``side``; returns descriptors."""
    tensors = list(tensors)
    if tensors:
      self.check_size()
    base, pos, out = self._base(side), 0, []
    for name, cls, arr in tensors:
      a = np.asarray(arr, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
      if a.dtype not in pr.DTYPE_CODES or (a.dtype == np.float64 and not self.wide_floats):
        a = a.astype(np.float32) if a.dtype.kind == "f" else a.astype(np.int32)
      n = a.nbytes
      if pos + n > self.region:
        raise pr.OversizedFrame(
            f"tensors need more than the arena's {self.region} bytes per region; "
            "raise bridge.arena_mb")
      self.buf[base + pos: base + pos + n] = a.reshape(-1).view(np.uint8)
      out.append(pr.TensorDesc(name, cls, a.dtype, tuple(a.shape), pos, n))
      pos += int(math.ceil(n / ALIGN) * ALIGN) if n else 0
    return tuple(out)

  def read(self, side: str, desc: pr.TensorDesc, *, copy: bool = True) -> np.ndarray:
    """The tensor ``desc`` from ``side`` (a private copy unless ``copy=False``)."""
    if desc.offset < 0 or desc.offset + desc.nbytes > self.region:
      raise pr.OutOfBounds(f"{desc.name}: bytes [{desc.offset}, {desc.offset + desc.nbytes})"
                           f" outside the {self.region}-byte region")
    if desc.offset % ALIGN:
      raise pr.OutOfBounds(f"{desc.name}: offset {desc.offset} is not {ALIGN}-byte aligned")
    self.check_size()
    base = self._base(side) + desc.offset
    view = np.frombuffer(self.buf, dtype=desc.dtype, count=int(np.prod(desc.shape)),
                         offset=base).reshape(desc.shape)
    return _aligned_copy(view) if copy else view

  def close(self) -> None:
    self.buf = None
    try:
      self.shm.close()
    except BufferError:  # pragma: no cover - a live numpy view; freed at exit
      pass
    if self.owner:
      try:
        self.shm.unlink()
      except FileNotFoundError:
        pass


# XLA CPU adopts host arrays aligned to this many bytes without copying them.
COPY_ALIGN = 64


def _aligned_copy(a: np.ndarray) -> np.ndarray:
  """A private copy of ``a`` in a ``COPY_ALIGN``-byte aligned buffer of its own."""
  raw = np.empty(a.nbytes + COPY_ALIGN, np.uint8)
  start = (-raw.ctypes.data) % COPY_ALIGN
  out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
  np.copyto(out, a)
  return out


def receive(arena: Arena, side: str, descs: tuple[pr.TensorDesc, ...],
            expect: dict[str, tuple[str, Any]], direction: str, traffic,
            *, finite: bool = False, recorder=None) -> dict[str, Any]:
  """Checks and copies in the tensors of one message; rebuilds them per prefix.

  Args:
    arena, side: where the payloads are.
    descs: the message's tensor descriptors.
    expect: ``{prefix: (ledger class, template)}``; the tensors must be exactly
      the template's leaves (names, shapes, dtypes), each tagged with the class
      declared for its prefix and allowed in ``direction``.
    direction: ``ledger.TO_ENCLAVE`` or ``ledger.TO_UNTRUSTED``.
    traffic: a ``ledger.Traffic`` that counts what crossed.
    finite: refuse NaN/Inf (checked on the private copy).
    recorder: optional ``recorder("tensor", (desc, array))``.

  Returns:
    ``{prefix: tree}``.
  """
  from enclave_bridge import ledger as lg
  by_name = {d.name: d for d in descs}
  known: set[str] = set()
  for prefix, (cls, template) in expect.items():
    lg.check(cls, direction)
    pr.check_against(template, prefix, by_name)
    names = set(pr.flatten(template, prefix))
    for n in names:
      if by_name[n].cls != cls:
        raise pr.UndeclaredTensor(f"{n}: class {by_name[n].cls!r}, declared {cls!r}")
    known |= names
  extra = set(by_name) - known
  if extra:
    raise pr.UndeclaredTensor(f"unexpected tensors {sorted(extra)[:5]}")
  values = {}
  for d in descs:
    arr = arena.read(side, d)  # a private copy first, then the checks
    # (bfloat16's numpy kind is "V", not "f": test every non-integer dtype)
    if finite and arr.dtype.kind != "i" and not np.all(np.isfinite(arr)):
      raise pr.NonFinite(f"{d.name}: NaN or Inf from the other side")
    values[d.name] = arr
    traffic.record(d.cls, d.nbytes)
    if recorder is not None:
      recorder("tensor", (d, arr))
  return {p: pr.rebuild(t, p, values) for p, (_, t) in expect.items()}


def send_parts(arena: Arena, side: str, parts, direction: str, traffic
               ) -> tuple[pr.TensorDesc, ...]:
  """Writes ``(prefix, class, tree)`` parts into ``side`` after the ledger check."""
  from enclave_bridge import ledger as lg
  items = []
  for prefix, cls, tree in parts:
    lg.check(cls, direction)
    for name, leaf in pr.flatten(tree, prefix).items():
      items.append((name, cls, np.asarray(leaf)))
  descs = arena.write(side, items)
  for d in descs:
    traffic.record(d.cls, d.nbytes)
  return descs

"""Tests of enclave_bridge.transport: the shared-memory arena and the framed channel (DESIGN 6)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing import shared_memory

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave_bridge import protocol as pr
from enclave_bridge.transport import (ALIGN, LOOPBACK, TRANSPORTS, Arena, Channel,
                                      ChannelClosed, listen, tcp_port)

ROOT = pathlib.Path(__file__).resolve().parents[2]
BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture
def arena():
  a = Arena.create(4096)
  yield a
  a.close()


def _tensors(rng):
  return [
      ("w", "public_weights", rng.standard_normal((3, 5, 7)).astype(np.float32)),
      ("i", "public_weights", rng.integers(-1000, 1000, (13,)).astype(np.int32)),
      ("h", "public_batch_stats", rng.standard_normal((2, 3)).astype(np.float16)),
      ("b", "conv_output_residual", rng.standard_normal((5,)).astype(BF16)),
      ("s", "loss_gradient", np.float32(2.5)),
      ("e", "public_weights", np.zeros((0, 4), np.float32)),
      ("z", "public_weights", np.array(-7, np.int32)),
  ]


# ------------------------------------------------------------------- arena
def test_create_rounds_the_region_to_the_alignment():
  a = Arena.create(1000)
  try:
    assert a.region == 1024 and a.region % ALIGN == 0
    assert a.shm.size >= 2 * a.region and a.owner
  finally:
    a.close()


@pytest.mark.parametrize("side", ["request", "reply"])
def test_write_then_read_through_a_second_handle(arena, side):
  items = _tensors(np.random.default_rng(0))
  descs = arena.write(side, items)
  assert [d.name for d in descs] == [n for n, _, _ in items]
  assert [d.cls for d in descs] == [c for _, c, _ in items]
  for d, (_, _, x) in zip(descs, items):
    assert d.offset % ALIGN == 0
    assert d.dtype == x.dtype and d.shape == np.shape(x) and d.nbytes == x.nbytes
  ends = [d.offset + d.nbytes for d in descs]
  assert all(e <= o for e, o in zip(ends, [d.offset for d in descs][1:]))  # no overlap
  other = Arena.attach(arena.name, arena.region)
  try:
    assert not other.owner
    for d, (_, _, x) in zip(descs, items):
      got = other.read(side, d)
      assert got.dtype == x.dtype and got.shape == np.shape(x)
      np.testing.assert_array_equal(got.astype(np.float32), np.asarray(x).astype(np.float32))
      # The same bytes in the same arena through the owner's handle.
      np.testing.assert_array_equal(arena.read(side, d), got)
  finally:
    other.close()
  # The non-owner's close does not unlink the block.
  again = shared_memory.SharedMemory(name=arena.name)
  again.close()


def test_request_and_reply_regions_are_separate(arena):
  (d1,) = arena.write("request", [("a", "public_weights", np.ones(16, np.float32))])
  (d2,) = arena.write("reply", [("a", "loss", np.full(16, 2, np.float32))])
  assert d1.offset == d2.offset == 0
  np.testing.assert_array_equal(arena.read("request", d1), 1)
  np.testing.assert_array_equal(arena.read("reply", d2), 2)
  with pytest.raises(ValueError):
    arena.write("sideways", [])
  with pytest.raises(ValueError):
    arena.read("sideways", d1)


def test_zero_dim_arrays_keep_their_shape(arena):
  descs = arena.write("request", [("a", "loss", np.float32(1.5)), ("b", "loss", np.array(3)),
                                  ("c", "loss", 4.0)])
  assert [d.shape for d in descs] == [(), (), ()]
  assert [d.dtype for d in descs] == [np.dtype(np.float32), np.dtype(np.int32),
                                      np.dtype(np.float32)]
  out = [arena.read("request", d) for d in descs]
  assert [o.shape for o in out] == [(), (), ()]
  assert [o.item() for o in out] == [1.5, 3, 4.0]


def test_unsupported_dtypes_are_converted(arena):
  x64 = np.linspace(-1, 1, 9).reshape(3, 3)
  items = [("f64", "public_weights", x64), ("i64", "public_weights", np.arange(5)),
           ("bool", "public_weights", np.array([True, False])),
           ("be", "public_weights", x64.astype(">f4")),
           ("fortran", "public_weights", np.asfortranarray(x64.astype(np.float32))),
           ("strided", "public_weights", x64.astype(np.float32)[:, ::2].T)]
  descs = arena.write("request", items)
  assert [d.dtype for d in descs] == [np.dtype(np.float32), np.dtype(np.int32),
                                      np.dtype(np.int32), np.dtype(np.float32),
                                      np.dtype(np.float32), np.dtype(np.float32)]
  for d, (_, _, x) in zip(descs, items):
    assert d.dtype in pr.DTYPE_CODES  # encodable
    np.testing.assert_allclose(arena.read("request", d), np.asarray(x, np.float64), rtol=1e-6)
  pr.decode(pr.encode(pr.Message(pr.Op.FORWARD, 0, 0, 0, {}, descs)))


def test_float64_crosses_only_in_a_float64_run(arena):
  x = np.array([1.0 + 1e-12, -2.0])
  (narrow,) = arena.write("request", [("x", "loss", x)])
  assert narrow.dtype == np.float32
  arena.wide_floats = True
  try:
    (wide,) = arena.write("request", [("x", "loss", x)])
    assert wide.dtype == np.float64
    np.testing.assert_array_equal(arena.read("request", wide), x)  # bit for bit
  finally:
    arena.wide_floats = False


def test_read_returns_a_private_copy(arena):
  (d,) = arena.write("request", [("x", "public_weights", np.arange(8, dtype=np.float32))])
  got = arena.read("request", d)
  view = arena.read("request", d, copy=False)
  arena.write("request", [("x", "public_weights", np.full(8, -1, np.float32))])
  np.testing.assert_array_equal(got, np.arange(8))  # unchanged: a copy
  np.testing.assert_array_equal(view, -1)           # the zero-copy view follows the arena
  got[:] = 5
  np.testing.assert_array_equal(arena.read("request", d), -1)
  del view


def _desc(offset, nbytes=64, shape=None, dtype=np.float32):
  shape = (nbytes // np.dtype(dtype).itemsize,) if shape is None else shape
  return pr.TensorDesc("x", "public_weights", np.dtype(dtype), shape, offset, nbytes)


@pytest.mark.parametrize("side", ["request", "reply"])
def test_read_rejects_out_of_bounds(arena, side):
  r = arena.region
  for desc in [_desc(r), _desc(r - 32), _desc(r - 64, 128), _desc(2**63), _desc(2**64 - 64),
               _desc(-64), _desc(0, r + 4), _desc(r + ALIGN, 0, shape=(0,))]:
    with pytest.raises(pr.OutOfBounds):
      arena.read(side, desc)
  # The last aligned tensor and an empty one at the very end are inside.
  assert arena.read(side, _desc(r - 64)).shape == (16,)
  assert arena.read(side, _desc(r, 0, shape=(0, 3))).shape == (0, 3)


@pytest.mark.parametrize("offset", [1, 4, 32, 63, 65])
def test_read_rejects_misaligned_offsets(arena, offset):
  with pytest.raises(pr.OutOfBounds, match="aligned"):
    arena.read("request", _desc(offset))


def test_write_more_than_the_region(arena):
  with pytest.raises(pr.OversizedFrame, match="arena_mb"):
    arena.write("request", [("x", "public_weights", np.zeros(arena.region // 4 + 1, np.float32))])
  # Alignment padding counts: two tensors that fit byte-wise may not fit padded.
  with pytest.raises(pr.OversizedFrame, match="arena_mb"):
    arena.write("reply", [("a", "loss", np.zeros(1, np.float32)),
                          ("b", "loss", np.zeros(arena.region // 4 - 1, np.float32))])
  # Exactly the region fits.
  (d,) = arena.write("request", [("x", "public_weights", np.ones(arena.region // 4, np.float32))])
  assert arena.read("request", d).sum() == arena.region // 4


def test_attach_to_a_too_small_arena():
  a = Arena.create(64 << 10)
  try:
    with pytest.raises(pr.OutOfBounds):
      Arena.attach(a.name, 4 * a.region)
    with pytest.raises(FileNotFoundError):
      Arena.attach("asymml-no-such-arena", 64)
  finally:
    a.close()


def test_owner_close_unlinks():
  a = Arena.create(4096)
  name = a.name
  b = Arena.attach(name, a.region)
  b.close()
  shared_memory.SharedMemory(name=name).close()  # still there
  a.close()
  with pytest.raises(FileNotFoundError):
    shared_memory.SharedMemory(name=name)
  a.close()  # idempotent


@pytest.mark.fault("shm_truncated")
def test_a_truncated_arena_is_refused_on_both_sides(arena):
  """Another process shrinks the segment: both handles refuse it instead of a SIGBUS."""
  other = Arena.attach(arena.name, arena.region)
  try:
    descs = arena.write("request", [("w", "public_weights", np.ones(8, np.float32))])
    os.ftruncate(other.shm._fd, arena.region)  # noqa: SLF001 - the untrusted side's act
    for handle in (arena, other):
      with pytest.raises(pr.OutOfBounds, match=r"truncated by another process"):
        handle.read("request", descs[0])
      with pytest.raises(pr.OutOfBounds, match=rf"is {arena.region} bytes"):
        handle.write("reply", [("w", "public_weights", np.ones(8, np.float32))])
    os.ftruncate(other.shm._fd, 2 * arena.region)  # noqa: SLF001 - restored: usable again
    descs = arena.write("request", [("w", "public_weights", np.ones(8, np.float32))])
    np.testing.assert_array_equal(other.read("request", descs[0]), np.ones(8))
  finally:
    other.close()


@pytest.mark.fault("shm_unlinked")
def test_an_unlinked_arena_still_carries_tensors(arena):
  other = Arena.attach(arena.name, arena.region)
  try:
    shared_memory.SharedMemory(name=arena.name).unlink()
    with pytest.raises(FileNotFoundError):
      Arena.attach(arena.name, arena.region)  # the name is gone for everyone else
    x = np.arange(12, dtype=np.float32)
    descs = arena.write("request", [("x", "public_weights", x)])
    np.testing.assert_array_equal(other.read("request", descs[0]), x)
  finally:
    other.close()
  arena.close()  # the owner's unlink finds nothing to remove: no error


CHILD = r"""
import json, sys
import numpy as np
from enclave_bridge import protocol as pr
from enclave_bridge.transport import Arena
cfg = json.loads(sys.argv[1])
a = Arena.attach(cfg["name"], cfg["region"])
out = []
for name, off, code, shape in cfg["descs"]:
  dt = pr.DTYPES[code]
  d = pr.TensorDesc(name, "x", dt, tuple(shape), off, int(np.prod(shape)) * dt.itemsize)
  out.append((name, float(np.asarray(a.read("request", d), np.float64).sum())))
a.write("reply", [("sums", "metrics", np.array([s for _, s in out], np.float32))])
print(json.dumps(out))
a.close()
"""


def test_attach_from_another_process(arena):
  items = _tensors(np.random.default_rng(1))
  descs = arena.write("request", items)
  cfg = {"name": arena.name, "region": arena.region,
         "descs": [(d.name, d.offset, pr.DTYPE_CODES[d.dtype], list(d.shape)) for d in descs]}
  proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  sums = dict(json.loads(proc.stdout))
  want = {n: float(np.asarray(x, np.float64).sum()) for n, _, x in items}
  assert sums.keys() == want.keys()
  for n in want:
    assert sums[n] == pytest.approx(want[n], rel=1e-6)
  got = arena.read("reply", pr.TensorDesc("sums", "metrics", np.dtype(np.float32),
                                          (len(items),), 0, 4 * len(items)))
  np.testing.assert_allclose(got, [want[n] for n, _, _ in items], rtol=1e-3)
  # The child's exit did not unlink the block (its resource tracker forgot it).
  shared_memory.SharedMemory(name=arena.name).close()


# ----------------------------------------------------------------- channel
@pytest.fixture(params=TRANSPORTS)
def pair(request, tmp_path_factory):
  """Two connected channels, through :func:`listen` and :meth:`Channel.connect`."""
  path = str(tmp_path_factory.mktemp("s", numbered=True) / "c.sock")
  if len(path) > 100:  # sun_path limit
    path = os.path.join(tempfile.mkdtemp(prefix="ast", dir="/tmp"), "c.sock")
  listener, address = listen(request.param, path)
  ca = Channel.connect(address, timeout=5)
  conn, _ = listener.accept()
  listener.close()
  cb = Channel(conn)
  yield ca, cb
  ca.close()
  cb.close()


def test_tcp_listens_on_the_loopback_interface_only():
  listener, address = listen("tcp")
  try:
    host, port = listener.getsockname()
    assert host == LOOPBACK and address == f"tcp://127.0.0.1:{port}"
    assert tcp_port(address) == port
  finally:
    listener.close()
  for bad in ("tcp://0.0.0.0:5000", "tcp://10.0.0.1:5000", "tcp://127.0.0.1:x",
              "tcp://127.0.0.1:0", "tcp://localhost:5000"):
    with pytest.raises(ValueError, match="only speaks TCP on 127.0.0.1"):
      tcp_port(bad)
  assert tcp_port("/tmp/a.sock") is None
  with pytest.raises(ValueError, match="bridge.transport"):
    listen("udp")


def test_the_unix_socket_is_private_to_its_user(tmp_path):
  path = str(tmp_path / "p.sock")
  listener, address = listen("unix", path)
  try:
    assert address == path and (os.stat(path).st_mode & 0o777) == 0o600
  finally:
    listener.close()


def test_tcp_channels_send_small_frames_at_once(pair):
  a, _ = pair
  if a.sock.family == socket.AF_INET:
    assert a.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=2000), max_size=5))
def test_frames_round_trip(pair, bodies):
  a, b = pair
  sent0, recv0 = a.bytes_sent, b.bytes_received
  for body in bodies:
    a.send(body)
  for body in bodies:
    assert b.recv(timeout=5) == body
  total = sum(len(x) + pr.LENGTH.size for x in bodies)
  assert a.bytes_sent - sent0 == total and b.bytes_received - recv0 == total


def test_a_maximal_frame_round_trips(pair):
  a, b = pair
  body = bytes(np.random.default_rng(0).integers(0, 256, pr.MAX_FRAME, dtype=np.uint8))
  t = threading.Thread(target=a.send, args=(body,))
  t.start()
  try:
    assert b.recv(timeout=10) == body
  finally:
    t.join(10)
  b.send(b"ok")
  assert a.recv(timeout=5) == b"ok"


@pytest.mark.fault("oversize_frames")
def test_send_refuses_an_oversized_frame(pair):
  a, _ = pair
  with pytest.raises(pr.OversizedFrame):
    a.send(b"\0" * (pr.MAX_FRAME + 1))
  assert a.bytes_sent == 0


@pytest.mark.fault("oversize_frames")
@pytest.mark.parametrize("n", [pr.MAX_FRAME + 1, 2**32 - 1])
def test_announced_length_over_the_limit(pair, n):
  a, b = pair
  a.sock.sendall(pr.LENGTH.pack(n) + b"x" * 100)
  with pytest.raises(pr.OversizedFrame):
    b.recv(timeout=5)


def test_peer_close_raises_channel_closed(pair):
  a, b = pair
  a.close()
  with pytest.raises(ChannelClosed):
    b.recv(timeout=5)


def test_peer_close_mid_frame(pair):
  a, b = pair
  a.sock.sendall(pr.LENGTH.pack(100) + b"x" * 10)
  a.close()
  with pytest.raises(ChannelClosed):
    b.recv(timeout=5)


def test_peer_close_mid_length_prefix(pair):
  a, b = pair
  a.sock.sendall(b"\0\0")
  a.close()
  with pytest.raises(ChannelClosed):
    b.recv(timeout=5)
  assert issubclass(ChannelClosed, ConnectionError)


def test_recv_timeout(pair):
  _, b = pair
  with pytest.raises(socket.timeout):
    b.recv(timeout=0.05)
  # The channel still works afterwards.
  pair[0].send(b"late")
  assert b.recv(timeout=5) == b"late"


def test_connect_to_a_listening_path(tmp_path):
  path = str(tmp_path / "s.sock")
  with pytest.raises(FileNotFoundError):
    Channel.connect(path, timeout=0.1)
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(path)
  listener.listen(1)
  try:
    c = Channel.connect(path, timeout=5)
    conn, _ = listener.accept()
    server = Channel(conn)
    c.send(pr.encode(pr.Message(pr.Op.HELLO, 0, 0, 0, {"x": 1}, ())))
    assert pr.decode(server.recv(timeout=5)).meta == {"x": 1}
    c.close()
    server.close()
  finally:
    listener.close()


def test_private_copies_are_aligned_and_independent_of_the_arena():
  arena = Arena.create(1 << 20)
  try:
    x = np.arange(3 * 5 * 7, dtype=np.float32).reshape(3, 5, 7)
    (desc,) = arena.write("request", [("x", "activation_residual", x)])
    got = arena.read("request", desc)
    assert got.ctypes.data % 64 == 0
    np.testing.assert_array_equal(got, x)
    arena.write("request", [("x", "activation_residual", x + 1)])  # the other side rewrites
    np.testing.assert_array_equal(got, x)  # the private copy is unchanged
  finally:
    arena.close()

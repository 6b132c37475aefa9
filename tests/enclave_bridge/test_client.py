"""The untrusted side of the bridge: BridgeClient and the enclave / tee_only backends.

Three layers of tests:

* :class:`BridgeClient` against a scripted stand-in enclave (a thread on a
  Unix socket): timeouts, a dead or closing peer, out-of-order and malformed
  replies, undeclared tensor classes.  No JAX, fast.
* The central invariant across the process boundary (DESIGN sections 1, 5):
  ``verify.compare`` gives the dense loss and gradients through ``inline``,
  ``local``, ``enclave`` and ``tee_only``; no enclave outlives its backend.
* Faults against a real enclave (DESIGN section 6): malformed, mistyped and
  non-finite tensors from the untrusted side are refused with typed errors and
  leave the enclave usable; ``kill -9`` of the enclave mid-step is a typed
  :class:`EnclaveDied` within seconds, never a hang.

Every enclave of this module compiles the same stage programs; an XLA
persistent compilation cache shared by the enclave subprocesses (only theirs:
the environment is set after this process's JAX is configured) pays that once.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing import shared_memory

import jax
import numpy as np
import pytest

import enclave_bridge
from asymml_jax import backends as bk
from asymml_jax import stages as st
from asymml_jax import data, sample_images, verify
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.models import get_model
from enclave_bridge import fault_table
from enclave_bridge import ledger as lg
from enclave_bridge import protocol as pr
from enclave_bridge import seal
from enclave_bridge.client import BridgeClient, EnclaveDied, EnclaveHung, EnclaveTimeout
from enclave_bridge.transport import Channel
from tests.helpers import enclave as he

Op = pr.Op
BATCH = 4
TOL = 1e-4


# =============================================================================
# BridgeClient against a scripted stand-in enclave
# =============================================================================
class FakeEnclave:
  """A stand-in enclave: answers each request with ``script(msg, client)``.

  ``script`` returns reply bytes, ``None`` (never answer) or ``"close"``
  (close the connection without answering).
  """

  def __init__(self, script):
    self.dir = tempfile.mkdtemp(prefix="afe", dir="/tmp")  # short: sun_path limit
    self.path = os.path.join(self.dir, "e.sock")
    self.script = script
    self.received: list[pr.Message] = []
    self.client: BridgeClient | None = None
    self.closed = threading.Event()
    self._stop = threading.Event()
    self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    self._listener.bind(self.path)
    self._listener.listen(1)
    self._thread = threading.Thread(target=self._serve, daemon=True)
    self._thread.start()

  def _serve(self):
    conn, _ = self._listener.accept()
    ch = Channel(conn)
    try:
      while not self._stop.is_set():
        try:
          body = ch.recv(timeout=0.1)
        except socket.timeout:
          continue
        except (ConnectionError, OSError):
          return
        msg = pr.decode(body)
        self.received.append(msg)
        reply = self.script(msg, self.client)
        if reply == "close":
          return
        if reply is not None:
          ch.send(reply)
    finally:
      ch.close()
      self._listener.close()
      self.closed.set()

  def connect(self, **kw) -> BridgeClient:
    self.client = BridgeClient(self.path, region_bytes=1 << 16, **kw)
    return self.client

  def shutdown(self):
    self._stop.set()
    if self.client is not None:
      self.client.channel.close()
      self.client.arena.close()
    self._thread.join(timeout=5)
    shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def fake():
  made = []

  def make(script):
    f = FakeEnclave(script)
    made.append(f)
    return f
  yield make
  for f in made:
    f.shutdown()


def _reply(msg, tensors=(), meta=None, seq=None) -> bytes:
  return pr.encode(pr.Message(Op.REPLY, msg.seq if seq is None else seq, msg.tag, msg.stage,
                              dict(meta or {}), tuple(tensors)))


def _f32(*shape):
  return jax.ShapeDtypeStruct(shape, np.float32)


def test_hung_enclave_is_a_timeout_not_a_hang(fake):
  f = fake(lambda msg, client: None)  # never answers
  client = f.connect(call_timeout=1.0)
  t0 = time.monotonic()
  with pytest.raises(EnclaveTimeout, match="no answer"):
    client.call(Op.STATS)
  assert time.monotonic() - t0 < 3.0


def test_exited_enclave_is_detected_while_waiting(fake):
  # The socket stays open (e.g. held by a helper) but the process is gone.
  f = fake(lambda msg, client: None)
  gone_at = time.monotonic() + 0.3
  client = f.connect(alive=lambda: time.monotonic() < gone_at, call_timeout=60.0)
  with pytest.raises(EnclaveDied, match="exited"):
    client.call(Op.STATS)
  assert time.monotonic() - gone_at < 2.0


def test_connection_closed_mid_call_is_enclave_died(fake):
  f = fake(lambda msg, client: "close")
  client = f.connect(call_timeout=60.0)
  t0 = time.monotonic()
  with pytest.raises(EnclaveDied):
    client.call(Op.STATS)
  assert time.monotonic() - t0 < 2.0


def test_sending_to_a_dead_enclave_is_enclave_died(fake):
  # The first call is answered, then the peer goes away: the next request's
  # send meets a closed socket (EPIPE), which must be the same typed error.
  f = fake(lambda msg, client: _reply(msg) if msg.seq == 0 else "close")
  client = f.connect(call_timeout=60.0)
  client.call(Op.STATS)
  f._stop.set()
  assert f.closed.wait(5)
  for _ in range(2):  # the second one certainly writes into a dead socket
    with pytest.raises(EnclaveDied):
      client.call(Op.STATS, meta={"pad": "x" * 4096})


def test_out_of_order_reply_is_refused(fake):
  f = fake(lambda msg, client: _reply(msg, seq=msg.seq + 5))
  client = f.connect()
  with pytest.raises(pr.OutOfOrder):
    client.call(Op.STATS)


@pytest.mark.parametrize("error", [pr.ShapeMismatch, pr.DtypeMismatch, pr.NonFinite,
                                   pr.StateError, pr.OutOfOrder])
def test_error_reply_is_reraised_typed(fake, error):
  f = fake(lambda msg, client: pr.encode(pr.error_message(
      msg.seq, msg.tag, msg.stage, error("refused for the test"))))
  client = f.connect()
  with pytest.raises(error, match="refused for the test"):
    client.call(Op.STATS)


@pytest.mark.parametrize("case,error", [
    ("shape", pr.ShapeMismatch),
    ("dtype", pr.DtypeMismatch),
    ("extra_name", pr.UndeclaredTensor),
    ("missing_name", pr.UndeclaredTensor),
    ("undeclared_class", pr.UndeclaredTensor),
    ("wrong_direction", pr.UndeclaredTensor),
    ("other_class", pr.UndeclaredTensor),
])
def test_malformed_reply_tensors_are_refused(fake, case, error):
  expect = {"rs": ("activation_residual", {"s0": _f32(2, 2)})}

  def script(msg, client):
    arrays = {"rs/s0": ("activation_residual", np.zeros((2, 2), np.float32))}
    if case == "shape":
      arrays["rs/s0"] = ("activation_residual", np.zeros((2, 3), np.float32))
    elif case == "dtype":
      arrays["rs/s0"] = ("activation_residual", np.zeros((2, 2), np.float16))
    elif case == "extra_name":
      arrays["rs/secret"] = ("activation_residual", np.zeros((2,), np.float32))
    elif case == "missing_name":
      del arrays["rs/s0"]
    elif case == "undeclared_class":
      arrays["rs/s0"] = ("raw_image", np.zeros((2, 2), np.float32))
    elif case == "wrong_direction":
      arrays["rs/s0"] = ("public_weights", np.zeros((2, 2), np.float32))
    elif case == "other_class":  # declared, but not for this prefix
      arrays["rs/s0"] = ("trusted_weight_gradient", np.zeros((2, 2), np.float32))
    descs = client.arena.write("reply", [(n, c, a) for n, (c, a) in arrays.items()])
    return _reply(msg, descs)

  seen = []
  f = fake(script)
  client = f.connect(recorder=lambda kind, payload: seen.append((kind, payload)))
  with pytest.raises(error):
    client.call(Op.FORWARD, expect=expect)
  # The refused reply's tensors were never handed on.
  assert all(kind == "frame" for kind, _ in seen)


def test_valid_reply_is_recorded_frame_and_tensors(fake):
  value = np.arange(4, dtype=np.float32).reshape(2, 2)

  def script(msg, client):
    descs = client.arena.write("reply", [("rs/s0", "activation_residual", value),
                                         ("loss", "loss", np.float32(1.5))])
    return _reply(msg, descs, meta={"server_s": 0.0})

  seen = []
  f = fake(script)
  client = f.connect(recorder=lambda kind, payload: seen.append((kind, payload)))
  _, out = client.call(Op.FORWARD, expect={"rs": ("activation_residual", {"s0": _f32(2, 2)}),
                                           "loss": ("loss", _f32())})
  np.testing.assert_array_equal(out["rs"]["s0"], value)
  assert float(out["loss"]) == 1.5
  kinds = [k for k, _ in seen]
  assert kinds == ["frame", "tensor", "tensor"]
  assert pr.decode(seen[0][1]).op == Op.REPLY
  assert {d.cls for _, (d, _) in seen[1:]} == {"activation_residual", "loss"}
  assert client.traffic_in.classes() == {"activation_residual", "loss"}


def test_undeclared_class_is_never_sent(fake):
  f = fake(lambda msg, client: _reply(msg))
  client = f.connect()
  with pytest.raises(pr.UndeclaredTensor):
    client.call(Op.FORWARD, parts=(("x", "raw_image", np.zeros((2,), np.float32)),))
  with pytest.raises(pr.UndeclaredTensor):  # a class of the other direction
    client.call(Op.FORWARD, parts=(("x", "activation_residual", np.zeros((2,), np.float32)),))
  client.call(Op.STATS)
  assert [m.op for m in f.received] == [Op.STATS]
  assert not client.traffic_out.classes()


# =============================================================================
# The central invariant across the process boundary
# =============================================================================
@pytest.fixture
def track_backends(monkeypatch):
  """Records every backend ``make_backend`` builds (to check their processes)."""
  made = []
  real = bk.make_backend

  def spy(*args, **kwargs):
    b = real(*args, **kwargs)
    made.append(b)
    return b
  monkeypatch.setattr(bk, "make_backend", spy)
  return made


def _assert_invariant(result, names, tol=TOL):
  rows = {r["name"]: r for r in result["backends"]}
  for r in result["backends"]:
    print(f"\n{result['model']} {r['name']:9s} loss {r['loss']:.6f}  rel err loss "
          f"{r['rel_err_loss']:.2e}  grads {r['rel_err_grads']:.2e}  ({r['worst_leaf']})",
          end="")
  assert set(names) <= set(rows)
  for name in names:
    r = rows[name]
    assert np.isfinite(r["loss"]), r
    assert r["rel_err_loss"] <= tol, r
    assert r["rel_err_grads"] <= tol, r
  assert result["max_rel_err_loss"] <= tol
  assert result["max_rel_err_grads"] <= tol


def _sharp_invariant(tmp_path, model, names, photos):
  result = verify.compare(model, names, batch=photos, dtype="float64",
                          prepare=enclave_bridge.verification_options(str(tmp_path), 10))
  _assert_invariant(result, names, verify.FLOAT64_TOLERANCE)
  assert result["passed"]
  return result


def _assert_no_orphans(backends, names):
  procs = {b.name: b.process for b in backends if b.name in bk.PROCESS_BACKENDS}
  assert set(procs) == set(names) & set(bk.PROCESS_BACKENDS)
  for name, proc in procs.items():
    assert proc.pid is not None
    assert he.pid_gone(proc.pid, within=5.0), f"{name} enclave pid {proc.pid} outlived close()"
    assert not proc.alive()


def test_sharp_invariant_across_the_process_boundary_on_photos(tmp_path, track_backends):
  """float64 in both processes, on four real photographs: enclave and tee_only
  match dense to verify.FLOAT64_TOLERANCE (inline and local are checked against
  dense in tests/asymml_jax/test_backends.py)."""
  names = ["enclave", "tee_only"]
  photos = {"image": sample_images.photo_batch(BATCH, 32), "label": np.array([3, 1, 4, 1])}
  result = _sharp_invariant(tmp_path, get_model("vgg11", width=0.125), names, photos)
  assert result["dtype"] == "float64" and result["tolerance"] == verify.FLOAT64_TOLERANCE
  assert not jax.config.jax_enable_x64  # restored afterwards
  rows = {r["name"]: r for r in result["backends"]}
  assert "per_sample" in rows["enclave"]["modes"]  # really split, not all trusted
  assert rows["tee_only"]["modes"] == ["trusted"]
  _assert_no_orphans(track_backends, names)


def test_the_verification_batch_is_sealed_so_step_0_reads_it_in_order(tmp_path):
  images = np.arange(5 * 32 * 32 * 3, dtype=np.float32).reshape(5, 32, 32, 3)
  labels = np.array([4, 0, 3, 1, 2])
  opts = enclave_bridge.verification_options(str(tmp_path), 10)(
      "enclave", {"image": images, "label": labels})
  assert opts["seed"] == 0
  assert seal.read_key_file(opts["key_path"]) == enclave_bridge.VERIFY_KEY
  ds = seal.unseal_dataset(opts["sealed_path"], opts["key_path"])
  assert not np.array_equal(ds.train_images, images)  # sealed permuted ...
  _, first = next(data.train_batches(ds.train_images, ds.train_labels, 5, seed=opts["seed"]))
  np.testing.assert_array_equal(first["image"], images)  # ... so that step 0 is the batch
  np.testing.assert_array_equal(first["label"], labels)


def test_central_invariant_with_calibrated_ranks(tmp_path, track_backends):
  """rank_plan='calibrate': the enclave picks each site's rank from the batch it holds
  (white noise here: high ranks); any rank keeps the split exact."""
  options = enclave_bridge.verification_options(str(tmp_path), 10)
  prepare = lambda *a, **k: {**options(*a, **k), "transport": "tcp"}  # the other transport
  result = verify.compare(get_model("vgg11", width=0.125), ["enclave"], batch_size=BATCH,
                          decomposition=DecompositionConfig(rank_plan="calibrate"),
                          prepare=prepare, floor=False)
  _assert_invariant(result, ["enclave"])
  _assert_no_orphans(track_backends, ["enclave"])


@pytest.mark.slow  # ~60 s: a cold compile of resnet20's 20 stages in two processes
def test_sharp_invariant_resnet20_enclave(tmp_path, track_backends):
  photos = {"image": sample_images.photo_batch(BATCH, 32), "label": np.array([0, 1, 2, 3])}
  _sharp_invariant(tmp_path, get_model("resnet20", width=0.25), ["enclave"], photos)
  _assert_no_orphans(track_backends, ["enclave"])


@pytest.mark.slow  # minutes: ImageNet-sized photographs through every backend
def test_sharp_invariant_resnet18_at_224_on_photos(tmp_path, track_backends):
  names = ["inline", "local", "enclave", "tee_only"]
  photos = {"image": sample_images.photo_batch(BATCH, 224), "label": np.array([0, 1, 2, 3])}
  model = get_model("resnet18", input_shape=(224, 224, 3), width=0.25)
  _sharp_invariant(tmp_path, model, names, photos)
  _assert_no_orphans(track_backends, names)


# =============================================================================
# A real enclave: traffic, refusals, kill -9
# =============================================================================
@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
  sealed_path, key_path = he.seal_to(he.random_dataset(n_train=16, n_test=8),
                                     tmp_path_factory.mktemp("sealed"))
  return sealed_path, key_path


@pytest.fixture(scope="module")
def model():
  return get_model("vgg11", width=0.125)


@pytest.fixture(scope="module")
def variables(model):
  return jax.device_get(model.init(jax.random.key(0)))


def _open(model, sealed, workdir, **options) -> bk.Backend:
  sealed_path, key_path = sealed
  return bk.make_backend("enclave", model, key=jax.random.key(1), batch_size=BATCH,
                         sealed_path=sealed_path, key_path=key_path, workdir=str(workdir),
                         eval_batch_size=BATCH, **options)


@pytest.fixture(scope="module")
def shared(model, sealed, tmp_path_factory):
  """One enclave backend for the tests that leave it usable (over TCP loopback: the
  refusal tests below then run over the transport Gramine uses)."""
  frames = []
  backend = _open(model, sealed, tmp_path_factory.mktemp("enclave"), transport="tcp",
                  recorder=lambda kind, payload: frames.append(kind))
  assert backend.process.address.startswith("tcp://127.0.0.1:")
  pid = backend.process.pid
  yield backend, frames
  backend.close()
  assert he.pid_gone(pid), "the enclave outlived close()"


def test_traffic_matches_the_ledger(shared, variables):
  backend, frames = shared
  backend.client.traffic_in, backend.client.traffic_out = lg.Traffic(), lg.Traffic()
  frames.clear()
  calls0 = backend.client.timing["calls"]
  params, stats = variables["params"], variables["batch_stats"]
  for step in range(2):
    loss, grads, new_stats, metrics = backend.grads(params, stats, None, step)
    assert np.isfinite(float(loss))
    assert float(metrics["count"]) == BATCH
  m = backend.evaluate(params, stats, None, 0)
  assert float(m["count"]) == BATCH
  expected = lg.expected_classes("enclave", train=True, batch_norm=True)
  assert backend.traffic_classes() == expected
  for cls in backend.client.traffic_in.classes():
    assert lg.LEDGER[cls].direction == lg.TO_UNTRUSTED
  for cls in backend.client.traffic_out.classes():
    assert lg.LEDGER[cls].direction == lg.TO_ENCLAVE
  # The recorder saw every reply frame.
  assert frames.count("frame") == backend.client.timing["calls"] - calls0


def test_site_ranks_are_reported_through_the_ledger(shared):
  backend, _ = shared
  before = backend.client.traffic_in.count["site_ranks"]
  ranks = backend.site_ranks()
  assert ranks == bk.plan_ranks(backend.plan) and ranks  # rank_plan=fraction: the plan's
  assert backend.client.traffic_in.count["site_ranks"] == before + len(ranks)


def test_liveness_follows_the_process(shared):
  backend, _ = shared
  assert backend.client.alive() is True
  assert backend.process.alive() is True


# ----------------------------------------------------- refusals from the enclave
def _zeros(template):
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), template)


def _forward(client, model, sig, tag, k, params, stats, yr=None, plan=None):
  """One FORWARD request built as the backend builds it (zeros for ``yr`` by default;
  ``params`` is the whole tree, or with ``plan=None`` already stage ``k``'s boundary part)."""
  expect = {"rs": ("activation_residual", sig["rs"]),
            "stats": ("batch_statistics", sig["new_stats"])}
  if sig["loss"] is not None:
    expect.update(loss=("loss", sig["loss"]), metrics=("metrics", sig["metrics"]))
  return client.call(Op.FORWARD, tag=tag, stage=k, expect=expect, parts=(
      ("yr", "conv_output_residual", _zeros(sig["yr"]) if yr is None else yr),
      ("params", "public_weights",
       params if plan is None else st.boundary_params(model, plan, params, k)),
      ("stats", "public_batch_stats", st.stage_stats(stats, k))))


def _bad(template, case):
  """``template``'s zeros with one leaf spoilt as ``case`` says."""
  tree = _zeros(template)
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  x = leaves[0]
  if case == "shape":
    x = np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype)
  elif case == "rank":
    x = np.zeros(x.shape[1:], x.dtype)
  elif case == "dtype_f16":
    x = x.astype(np.float16)
  elif case == "dtype_i32":
    x = x.astype(np.int32)
  elif case == "nan":
    x = x.copy()
    x.reshape(-1)[7] = np.nan
  elif case == "inf":
    x = x.copy()
    x.reshape(-1)[-1] = -np.inf
  leaves[0] = x
  return jax.tree_util.tree_unflatten(treedef, leaves)


ERRORS = {"shape": pr.ShapeMismatch, "rank": pr.ShapeMismatch,
          "dtype_f16": pr.DtypeMismatch, "dtype_i32": pr.DtypeMismatch,
          "nan": pr.NonFinite, "inf": pr.NonFinite}


@pytest.mark.fault("nan_from_accelerator")
@pytest.mark.parametrize("where", ["conv_output_residual", "public_weights"])
@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_forward_is_refused_and_the_enclave_stays_usable(shared, model, variables,
                                                              where, case):
  backend, _ = shared
  client = backend.client
  params, stats = variables["params"], variables["batch_stats"]
  tag = 1000 + list(ERRORS).index(case) + 100 * (where == "public_weights")
  meta, _ = client.call(Op.BEGIN, tag=tag, meta={"train": True, "index": 0})
  n = int(meta["batch_size"])
  plan = backend.plan
  sigs = st.stage_signatures(model, plan, n, True, boundary=True)
  try:
    _forward(client, model, sigs[0], tag, 0, params, stats, plan=plan)
    good = st.boundary_params(model, plan, params, 1)
    if where == "conv_output_residual":
      bad_yr, bad_params = _bad(sigs[1]["yr"], case), good
    else:  # a kernel stage 1 carries (the next group's, for the overlap)
      bad_yr = None
      bad_params = jax.tree_util.tree_map(lambda x: x, good)
      name = sorted(bad_params["next"])[0]
      kernel = bad_params["next"][name]
      bad_params["next"][name] = _bad({"k": jax.ShapeDtypeStruct(
          kernel.shape, kernel.dtype)}, case)["k"]
    with pytest.raises(ERRORS[case]):
      _forward(client, model, sigs[1], tag, 1, bad_params, stats, yr=bad_yr)
    # Nothing was half-done: the same stage with good tensors goes through.
    _, out = _forward(client, model, sigs[1], tag, 1, good, stats)
    assert set(out["rs"]) == set(sigs[1]["rs"])
  finally:
    client.call(Op.END, tag=tag)


@pytest.mark.fault("nan_from_accelerator")
@pytest.mark.parametrize("what", ["dloss_nan", "dloss_inf", "drs_shape", "drs_dtype"])
def test_bad_backward_is_refused(shared, model, variables, what):
  backend, _ = shared
  client = backend.client
  params, stats = variables["params"], variables["batch_stats"]
  tag = 2000 + ["dloss_nan", "dloss_inf", "drs_shape", "drs_dtype"].index(what)
  meta, _ = client.call(Op.BEGIN, tag=tag, meta={"train": True, "index": 0})
  sigs = st.stage_signatures(model, backend.plan, int(meta["batch_size"]), True,
                             boundary=True)
  last = model.num_stages - 1
  try:
    for k in range(model.num_stages):
      _forward(client, model, sigs[k], tag, k, params, stats, plan=backend.plan)
    # stage `last` is trusted (no residual out); stage 0 hands out the image residual.
    k, drs_t = (last, sigs[last]["rs"]) if what.startswith("dloss") else (0, sigs[0]["rs"])
    drs = _zeros(drs_t)
    dloss = np.float32(1.0)
    if what == "dloss_nan":
      dloss = np.float32(np.nan)
    elif what == "dloss_inf":
      dloss = np.float32(np.inf)
    elif what == "drs_shape":
      drs = _bad(drs_t, "shape")
    elif what == "drs_dtype":
      drs = _bad(drs_t, "dtype_f16")
    error = {"dloss_nan": pr.NonFinite, "dloss_inf": pr.NonFinite,
             "drs_shape": pr.ShapeMismatch, "drs_dtype": pr.DtypeMismatch}[what]
    with pytest.raises(error):
      client.call(Op.BACKWARD, tag=tag, stage=k,
                  expect={"dyr": ("output_gradient_residual", sigs[k]["yr"]),
                          "dparams": ("trusted_weight_gradient", sigs[k]["params"])},
                  parts=(("drs", "residual_gradient", drs), ("dloss", "loss_gradient", dloss)))
  finally:
    client.call(Op.END, tag=tag)


@pytest.mark.fault("shm_truncated", "shm_unlinked")
def test_truncated_or_unlinked_arena(shared, variables):
  """The untrusted side truncates the arena: the next step fails with ``OutOfBounds``
  (the driver's own check, or the enclave's when the truncation comes after the
  request was written), nothing hangs; once restored, or merely unlinked, the
  arena carries steps as before."""
  backend, _ = shared
  client = backend.client
  params, stats = variables["params"], variables["batch_stats"]
  fd = client.arena.shm._fd  # noqa: SLF001 - the untrusted side's act
  full = 2 * client.arena.region
  real_send = client.channel.send

  def truncate_then_send(body):  # after the request is in the arena: the enclave's check
    os.ftruncate(fd, client.arena.region)
    real_send(body)
  for hook in (None, truncate_then_send):
    if hook is None:
      os.ftruncate(fd, client.arena.region)
    else:
      client.channel.send = hook
    t0 = time.monotonic()
    try:
      with pytest.raises(pr.OutOfBounds, match="truncated by another process"):
        backend.grads(params, stats, None, 3)
    finally:
      client.channel.send = real_send
      os.ftruncate(fd, full)
    assert time.monotonic() - t0 < 10.0
  loss, _, _, _ = backend.grads(params, stats, None, 3)
  shared_memory.SharedMemory(name=client.arena.name).unlink()
  again, _, _, _ = backend.grads(params, stats, None, 3)
  assert np.isfinite(float(loss)) and float(again) == float(loss)


def test_enclave_still_trains_after_refusals(shared, variables):
  backend, _ = shared
  loss, _, _, _ = backend.grads(variables["params"], variables["batch_stats"], None, 5)
  assert np.isfinite(float(loss))


# ----------------------------------------------------------------- kill -9
@pytest.mark.fault("enclave_sigkill_forward", "enclave_sigkill_backward",
                   "enclave_sigkill_between_calls")
@pytest.mark.parametrize("when,transport", [("forward", "unix"), ("backward", "tcp"),
                                            ("between_calls", "tcp")])
def test_kill_9_mid_step_is_enclave_died_fast(model, sealed, variables, tmp_path, when,
                                              transport):
  """SIGKILL of the enclave while a step runs: a typed error within the fault table's
  bound, no hang.

  ``forward`` (``backward``): a background thread kills the enclave as soon as
  the driver has sent stage 2's forward (the first backward) of step 1; the
  driver is then waiting for the reply.  ``between_calls``: the enclave is
  killed (and reaped by the kernel) right after stage 2's reply, so the next
  request meets a dead socket.
  """
  within = fault_table.bound(f"enclave_sigkill_{when}")
  params, stats = variables["params"], variables["batch_stats"]
  backend = _open(model, sealed, tmp_path / "w", transport=transport)
  pid = backend.process.pid
  client = backend.client
  killed_at: list[float] = []
  armed = threading.Event()
  sent_stage2 = threading.Event()
  cancelled = threading.Event()
  real_send = client.channel.send

  def kill():
    killed_at.append(time.monotonic())
    os.kill(pid, signal.SIGKILL)

  def send(body):
    real_send(body)
    msg = pr.decode(body)
    if armed.is_set() and ((when == "forward" and msg.op == Op.FORWARD and msg.stage == 2)
                           or (when == "backward" and msg.op == Op.BACKWARD)):
      sent_stage2.set()

  def recorder(kind, payload):
    if when == "between_calls" and kind == "frame" and armed.is_set() and not killed_at:
      msg = pr.decode(payload)
      if msg.op == Op.REPLY and msg.stage == 2 and msg.tag == 1:
        kill()
        assert he.pid_gone(pid, within=5.0)

  client.channel.send = send
  client.recorder = recorder
  killer = threading.Thread(
      target=lambda: sent_stage2.wait(60) and not cancelled.is_set() and kill(), daemon=True)
  try:
    loss, _, _, _ = backend.grads(params, stats, None, 0)
    assert np.isfinite(float(loss))
    armed.set()
    if when != "between_calls":
      killer.start()
    with pytest.raises(EnclaveDied) as info:
      backend.grads(params, stats, None, 1)
    raised_at = time.monotonic()
    assert killed_at, "the enclave was not killed during the step"
    latency = raised_at - killed_at[0]
    print(f"\nkill -9 ({when}) -> {type(info.value).__name__} after {latency:.3f} s: "
          f"{info.value}")
    assert latency < within
    assert "enclave" in str(info.value)
    if when != "between_calls":  # the driver saw the process go, and says how
      assert "died (SIGKILL)" in str(info.value)
    # A SIGKILLed multi-threaded process is a zombie (pid_gone) before waitpid can
    # reap it: its other threads may still be exiting (an XLA computation, e.g. the
    # prefetch of the overlap, was running).  Allow that moment.
    deadline = time.monotonic() + 5.0
    while backend.process.alive() and time.monotonic() < deadline:
      time.sleep(0.02)
    assert not backend.process.alive()
    assert backend.client.alive() is False
    # Later calls fail fast too, and closing is clean.
    t0 = time.monotonic()
    with pytest.raises(EnclaveDied):
      backend.grads(params, stats, None, 2)
    with pytest.raises(EnclaveDied):
      backend.evaluate(params, stats, None, 0)
    assert time.monotonic() - t0 < within
  finally:
    if killer.is_alive():
      cancelled.set()
      sent_stage2.set()
      killer.join(5)
    backend.close()
  assert he.pid_gone(pid)


@pytest.mark.fault("enclave_sigstop")
def test_stopped_enclave_is_enclave_hung_within_the_watchdog_time(model, sealed, variables,
                                                                   tmp_path):
  """SIGSTOP of the enclave (a hang): ``EnclaveHung`` naming its state, after
  ``bridge.watchdog_s`` without progress, instead of a silent wait."""
  params, stats = variables["params"], variables["batch_stats"]
  backend = _open(model, sealed, tmp_path / "w", watchdog_s=2.0)
  pid = backend.process.pid
  try:
    backend.grads(params, stats, None, 0)  # compiled and serving
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(EnclaveHung) as info:
      backend.grads(params, stats, None, 1)
    took = time.monotonic() - t0
    print(f"\nSIGSTOP -> EnclaveHung after {took:.2f} s: {info.value}")
    assert 2.0 <= took < fault_table.bound("enclave_sigstop")
    assert "state T (stopped)" in str(info.value) and "BEGIN of step 1" in str(info.value)
    assert isinstance(info.value, EnclaveTimeout)
  finally:
    backend.close()
  assert he.pid_gone(pid, within=5.0)


def test_closed_backend_leaves_no_process_or_socket(model, sealed, variables, tmp_path):
  with _open(model, sealed, tmp_path / "w") as backend:
    pid = backend.process.pid
    sock = backend.process.spec.socket_path
    assert os.path.exists(sock)
    m = backend.evaluate(variables["params"], variables["batch_stats"], None, 1)
    assert float(m["count"]) == BATCH
  assert he.pid_gone(pid, within=5.0)
  assert not os.path.exists(sock)
  # The socket's temporary folder (made by the backend, not the caller) is gone too;
  # the caller's workdir stays.
  assert not os.path.exists(os.path.dirname(sock))
  assert os.path.isdir(tmp_path / "w")


# ------------------------------------------------------------------ tee_only
def test_tee_only_trains_and_evaluates(model, sealed, variables, tmp_path):
  sealed_path, key_path = sealed
  with bk.make_backend("tee_only", model, key=jax.random.key(1), batch_size=BATCH,
                       sealed_path=sealed_path, key_path=key_path,
                       workdir=str(tmp_path / "w"), eval_batch_size=BATCH) as backend:
    pid = backend.process.pid
    params, stats = variables["params"], variables["batch_stats"]
    for step in range(2):
      loss, grads, new_stats, metrics = backend.grads(params, stats, None, step)
      assert np.isfinite(float(loss))
      assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
      assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
      assert float(metrics["count"]) == BATCH
      params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
      stats = new_stats
    for i in range(2):
      m = backend.evaluate(params, stats, None, i)
      assert float(m["count"]) == BATCH and np.isfinite(float(m["loss_sum"]))
    assert backend.traffic_classes() == lg.expected_classes(
        "tee_only", train=True, batch_norm=True)
  assert he.pid_gone(pid)


# ----------------------------------------------------------------------- DP
def test_dp_through_the_enclave_noises_every_release(sealed, tmp_path):
  """End to end: Poisson batches in the enclave, clipped+noised residuals, only dY_R."""
  from asymml_jax.privacy.config import PrivacyConfig
  gmodel = get_model("vgg11", width=0.125, norm="group")
  clip, sigma = 1e-3, 2.0
  dp = PrivacyConfig(enabled=True, clip=clip, grad_clip=1e-6, noise_multiplier=sigma)
  received = []
  sealed_path, key_path = sealed
  v = jax.device_get(gmodel.init(jax.random.key(0)))
  with bk.make_backend("enclave", gmodel, key=jax.random.key(1), batch_size=12,
                       privacy=dp, expected_batch_size=4.0, sealed_path=sealed_path,
                       key_path=key_path, workdir=str(tmp_path / "w"), eval_batch_size=BATCH,
                       recorder=lambda kind, p: received.append(p) if kind == "tensor" else None
                       ) as backend:
    counts = []
    for step in range(2):
      loss, grads, _, metrics = backend.grads(v["params"], v["batch_stats"], None, step)
      assert np.isfinite(float(loss))
      assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
      counts.append(float(metrics["count"]))
    assert all(0 <= c <= 12 for c in counts)  # realised Poisson sizes behind a 12-row pad
    assert backend.traffic_classes() == lg.expected_classes(
        "enclave", train=True, batch_norm=False, gradient_protection="decompose")
  residuals = [np.asarray(a) for d, a in received if d.cls == "activation_residual"]
  grads_out = [np.asarray(a) for d, a in received if d.cls == "output_gradient_residual"]
  assert residuals and grads_out
  for r in residuals:  # clipped part has norm <= 1e-3: the elements are the noise
    assert r.std() == pytest.approx(sigma * clip, rel=0.1)
  for g in grads_out:
    assert g.std() == pytest.approx(sigma * 1e-6, rel=0.1)

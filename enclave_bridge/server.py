"""The enclave host process (DESIGN sections 2 and 6).

``python -m enclave_bridge.server --socket=PATH --sealed=DATA --key=KEYFILE``
(or ``--transport=tcp``: 127.0.0.1 on an ephemeral port, printed when ready)

It alone holds private data: it decrypts the sealed data set with the key
file, samples every batch itself (the untrusted side only names a step), runs
every trusted stage through :class:`asymml_jax.executor.TrustedExecutor`
(decomposition, low-rank convolution, normalisation, ReLU, pooling,
shortcuts, the head and the loss with the labels) and keeps per-step state
keyed by ``(step, stage)``.  Requests arrive as validated frames
(``protocol.py``) with tensors in the shared-memory arena (``transport.py``);
every tensor is checked against the boundary ledger and against the shapes the
enclave itself expects, before use.  Any refusal is a typed ``ERROR`` reply;
the server never crashes or hangs on a bad frame.

Its RNG key never leaves: it is derived from the sealing key and the run seed
(HMAC-SHA256), so a restarted enclave repeats its decompositions while the
untrusted side, which lacks the key, cannot predict them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sys
import time
from typing import Any

import numpy as np

from enclave_bridge import allocator
from enclave_bridge import auth
from enclave_bridge import ledger as lg
from enclave_bridge import protocol as pr
from enclave_bridge import transport
from enclave_bridge.transport import Arena, Channel, ChannelClosed, receive, send_parts

Op = pr.Op
# Every tensor from the untrusted side is checked finite (weights, statistics,
# residual convolutions and gradients alike) before the enclave uses it.


def trusted_seed(seal_key: bytes, run_seed: int) -> int:
  """The enclave's RNG seed: ``HMAC-SHA256(seal_key, "asymml-rng" || run_seed)``."""
  mac = hmac.new(seal_key, b"asymml-rng" + int(run_seed).to_bytes(8, "big", signed=True),
                 hashlib.sha256).digest()
  return int.from_bytes(mac[:8], "big") & ((1 << 63) - 1)


class EnclaveServer:
  """Request handler of the enclave; :meth:`handle` maps a frame to a reply frame."""

  def __init__(self, dataset, seal_key: bytes, secret: str | None = None):
    self.ds = dataset
    self._seal_key = seal_key
    self._secret = secret  # the launch secret HELLO must prove (auth.py), if any
    self.drop_peer = False  # set when the connected peer failed to authenticate
    self.next_seq = 0
    self.arena: Arena | None = None
    self.cfg: dict[str, Any] | None = None
    self.traffic_in = lg.Traffic()
    self.traffic_out = lg.Traffic()
    self.compute_seconds = 0.0
    self.copy_seconds = 0.0
    self.calls = 0
    self.shutdown = False
    self.overlap_seconds = 0.0
    self._deferred: tuple[float, float] | None = None  # (start, seconds) of the last prefetch

  # ------------------------------------------------------------------ frames
  def handle(self, body: bytes) -> bytes:
    """Never raises: every failure becomes a typed ``ERROR`` reply."""
    seq = tag = stage = 0
    try:
      msg = pr.decode(body)
      seq, tag, stage = msg.seq, msg.tag, msg.stage
      if msg.op not in pr.REQUEST_OPS:
        raise pr.UnknownOp(f"{msg.op.name} is not a request")
      if msg.seq != self.next_seq:
        raise pr.OutOfOrder(f"sequence number {msg.seq}, expected {self.next_seq} "
                            "(replayed or reordered frame)")
      self.next_seq += 1
      if self.cfg is None and msg.op not in (Op.HELLO, Op.SHUTDOWN):
        raise pr.StateError("HELLO must come first")
      if self.cfg is None and msg.op == Op.SHUTDOWN and self._secret is not None:
        raise pr.AuthenticationFailed("SHUTDOWN before an authenticated HELLO")
      t0 = time.perf_counter()
      meta, tensors = getattr(self, f"_on_{msg.op.name.lower()}")(msg)
      self.calls += 1
      meta = dict(meta, server_s=time.perf_counter() - t0)
      meta.update(self._deferred_share(msg.meta.get("sent_at")))
      return pr.encode(pr.Message(Op.REPLY, msg.seq, msg.tag, msg.stage, meta, tensors))
    except Exception as e:  # noqa: BLE001 - every failure is a typed reply
      if isinstance(e, (KeyError, AttributeError)) and not isinstance(e, pr.ProtocolError):
        e = pr.EnclaveFailure(f"{type(e).__name__}: {e}")
      try:
        from asymml_jax.executor import ExecutorError
        from asymml_jax.integrity import IntegrityError
        if isinstance(e, ExecutorError):
          e = pr.StateError(str(e))
        elif isinstance(e, IntegrityError):
          e = pr.IntegrityViolation(str(e))
      except ImportError:  # pragma: no cover
        pass
      # Before an authenticated HELLO a refused frame ends the connection, so a
      # stray peer cannot hold the enclave's one driver slot.
      self.drop_peer = self.cfg is None and self._secret is not None
      return pr.encode(pr.error_message(seq, tag, stage, e))

  # ----------------------------------------------------------------- overlap
  def after_reply(self) -> None:
    """Work deferred until a reply is out: the next stage's ``Y_L`` (DESIGN section 3, step 3).

    It runs while the accelerator convolves the residuals just sent.  A
    failure here is not reported: the forward that needs ``Y_L`` computes it
    again and reports its own error.
    """
    executor = getattr(self, "executor", None)
    if executor is None or not executor.overlap:
      return
    t0 = time.monotonic()
    try:
      served = executor.prefetch()
    except Exception:  # noqa: BLE001 - see the docstring
      served = 0
    dt = time.monotonic() - t0
    if served:
      self._deferred = (t0, dt)
      self.compute_seconds += dt

  def _deferred_share(self, sent_at) -> dict[str, float]:
    """How much of the last deferred work the next request waited for.

    ``sent_at`` is the client's ``time.monotonic()`` when it sent this request
    (one clock for both processes on one machine).  The deferred work before it
    overlapped the untrusted side's compute (``overlap_s``); the rest delayed
    this call and counts as its trusted compute.
    """
    if self._deferred is None:
      return {}
    start, seconds = self._deferred
    self._deferred = None
    hidden = 0.0
    if isinstance(sent_at, (int, float)):
      hidden = min(seconds, max(0.0, float(sent_at) - start))
    self.overlap_seconds += hidden
    return {"overlap_s": hidden, "deferred_exposed_s": seconds - hidden}

  def _read(self, msg: pr.Message, expect: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """Validates and copies in the request's tensors (``{prefix: (class, template)}``)."""
    t0 = time.perf_counter()
    out = receive(self.arena, "request", msg.tensors, expect, lg.TO_ENCLAVE,
                  self.traffic_in, finite=True)
    self.copy_seconds += time.perf_counter() - t0
    return out

  def _write(self, parts: list[tuple[str, str, Any]]) -> tuple[pr.TensorDesc, ...]:
    t0 = time.perf_counter()
    descs = send_parts(self.arena, "reply", parts, lg.TO_UNTRUSTED, self.traffic_out)
    self.copy_seconds += time.perf_counter() - t0
    return descs

  # ---------------------------------------------------------------- handlers
  def _on_hello(self, msg: pr.Message):
    import jax
    from asymml_jax import backends as bk
    from asymml_jax import precision
    from asymml_jax import stages as st
    from asymml_jax import data
    from asymml_jax.decomposition import DecompositionConfig
    from asymml_jax.executor import TrustedExecutor
    from asymml_jax.models import get_model
    from asymml_jax.privacy.config import PrivacyConfig
    if self.cfg is not None:
      raise pr.StateError("HELLO was already received")
    c = msg.meta
    proof = auth.check_hello(self._secret, c)
    try:
      backend = str(c["backend"])
      if backend not in ("enclave", "tee_only"):
        raise pr.StateError(f"backend must be enclave or tee_only, got {backend!r}")
      model = get_model(str(c["model"]), num_classes=self.ds.num_classes,
                        input_shape=self.ds.image_shape, width=float(c["width"]),
                        norm=str(c["norm"]))
      decomposition = DecompositionConfig(**dict(c["decomposition"]))
      privacy = PrivacyConfig(**dict(c.get("privacy") or {}))
      n_train = len(self.ds.train_labels)
      batch_size, eval_bs = int(c["batch_size"]), int(c["eval_batch_size"])
      expected = c.get("expected_batch_size")
      expected = None if expected is None else float(expected)
      if not 1 <= batch_size <= n_train or eval_bs < 1:
        raise ValueError(f"batch sizes {batch_size}, {eval_bs} out of range")
      seed = int(c["seed"])
      dtype = precision.check_dtype(str(c.get("dtype", "float32")))
      residual_dtype = {"float32": None, "bfloat16": "bfloat16"}[str(c.get("residual_dtype", "float32"))]
      region = int(c["region"])
      if region <= 0 or region % 64:
        raise ValueError(f"region must be a positive multiple of 64 bytes, got {region}")
      arena = Arena.attach(str(c["arena"]), region)
    except (KeyError, TypeError, ValueError, OSError) as e:
      raise pr.MalformedFrame(f"bad HELLO config: {type(e).__name__}: {e}") from None
    # The enclave enforces the DP rules itself (DESIGN section 7), whatever the
    # untrusted side believes.
    try:
      if privacy.enabled and privacy.target_epsilon is not None:
        raise ValueError("the noise multiplier must be fixed (calibrated) before HELLO")
      privacy.validate_for(norm=model.norm, scope=decomposition.scope, num_examples=n_train)
      if privacy.batch_sampling == "poisson":
        if expected is None:
          raise ValueError("Poisson sampling needs expected_batch_size")
        if batch_size != data.poisson_max_batch(expected, n_train):
          raise ValueError(f"batch_size {batch_size} is not the padded Poisson size "
                           f"{data.poisson_max_batch(expected, n_train)} for "
                           f"{expected:g} expected of {n_train}")
    except ValueError as e:
      arena.close()
      raise pr.StateError(f"privacy settings refused: {e}") from None
    self.arena = arena
    arena.wide_floats = dtype == "float64"
    # Before any signature or program is built: the run's precision (verification
    # runs in float64, asymml_jax.precision).
    jax.config.update("jax_enable_x64", dtype == "float64")
    plan = bk.make_plan_for(backend, model, batch_size, decomposition, privacy=privacy,
                            expected_batch_size=expected)
    client_modes = c.get("modes")
    modes = {s: p.mode for s, p in plan.sites.items()}
    if client_modes is not None and client_modes != modes:
      raise pr.StateError(f"the untrusted side planned {client_modes}, the enclave {modes}")
    key = jax.random.key(trusted_seed(self._seal_key, seed))
    self.model, self.plan, self.seed = model, plan, seed
    self.batch_size, self.eval_bs, self.backend = batch_size, eval_bs, backend
    self.augment = (bool(c.get("augment_flip", False)), int(c.get("augment_crop", 0)))
    self.executor = TrustedExecutor(model, plan, key, overlap=True)
    self.sampler_seed = trusted_seed(self._seal_key, seed ^ 0x5A4D504C)  # private batches
    self.truncated_steps = 0
    self.sigs = {True: st.stage_signatures(model, plan, batch_size, True, residual_dtype,
                                           boundary=True),
                 False: st.stage_signatures(model, plan, eval_bs, False, residual_dtype,
                                            boundary=True)}
    self.train_tags: dict[int, bool] = {}
    if backend == "tee_only":
      self.whole = bk.InlineBackend(model, plan, key, name="tee_only")
      self.variables = jax.eval_shape(model.init, key)
    self.cfg = dict(c)
    return ({"num_train": int(len(self.ds.train_labels)),
             "num_test": int(len(self.ds.test_labels)),
             "image_shape": list(self.ds.image_shape), "num_classes": self.ds.num_classes,
             "modes": modes, "pid": os.getpid(), **({"auth": proof} if proof else {})}, ())

  def _batch(self, tag: int, train: bool, index: int) -> dict:
    from asymml_jax import data
    if train:
      if tag < 0:
        raise pr.StateError(f"training steps are >= 0, got {tag}")
      if self.plan.privacy.batch_sampling == "poisson":
        # Batch composition is private: sampled with the enclave's own seed.
        batch, truncated = data.poisson_batch(
            self.ds.train_images, self.ds.train_labels, self.plan.expected_batch_size,
            seed=self.sampler_seed, step=tag)
        self.truncated_steps += int(truncated)
      else:
        _, batch = next(data.train_batches(self.ds.train_images, self.ds.train_labels,
                                           self.batch_size, seed=self.seed, start_step=tag))
      flip, crop = self.augment
      if flip or crop:
        batch = data.augment(batch, np.random.default_rng([self.seed, 2, tag]),
                             flip=flip, crop_pad=crop)
      return batch
    n = len(self.ds.test_labels)
    if not 0 <= index < -(-n // self.eval_bs):
      raise pr.StateError(f"eval batch {index} out of range")
    lo = index * self.eval_bs
    sl = slice(lo, min(n, lo + self.eval_bs))
    return next(data.eval_batches(self.ds.test_images[sl], self.ds.test_labels[sl],
                                  self.eval_bs))

  def _on_begin(self, msg: pr.Message):
    train = bool(msg.meta.get("train", False))
    index = int(msg.meta.get("index", 0))
    from asymml_jax import precision
    batch = precision.cast_floats(self._batch(msg.tag, train, index))
    self.executor.end(msg.tag)
    self.executor.begin(msg.tag, batch, train=train)
    self.train_tags[msg.tag] = train
    if self.backend == "tee_only":
      self._whole_batch = (msg.tag, batch)
    return {"batch_size": int(batch["image"].shape[0])}, ()

  def _train_flag(self, tag: int) -> bool:
    if tag not in self.train_tags:
      raise pr.StateError(f"unknown step {tag}: BEGIN it first")
    return self.train_tags[tag]

  def _on_forward(self, msg: pr.Message):
    k = msg.stage
    train = self._train_flag(msg.tag)
    if not 0 <= k < self.model.num_stages:
      raise pr.StateError(f"stage {k} out of range")
    sig = self.sigs[train][k]
    ins = self._read(msg, {"yr": ("conv_output_residual", sig["yr"]),
                           "params": ("public_weights", sig["params"]),
                           "stats": ("public_batch_stats", sig["stats"])})
    t0 = time.perf_counter()
    rs, loss, metrics, new_stats = self.executor.forward(
        msg.tag, k, ins["yr"] or {}, ins["params"], ins["stats"] or {})
    import jax
    rs, loss, metrics, new_stats = jax.device_get((rs, loss, metrics, new_stats))
    dt = time.perf_counter() - t0
    self.compute_seconds += dt
    out = [("rs", "activation_residual", rs), ("stats", "batch_statistics", new_stats)]
    if loss is not None:
      out += [("loss", "loss", loss), ("metrics", "metrics", metrics)]
    return {"compute_s": dt}, self._write(out)

  def _on_backward(self, msg: pr.Message):
    k = msg.stage
    if not self._train_flag(msg.tag):
      raise pr.StateError(f"step {msg.tag} is an eval batch: no backward")
    if not 0 <= k < self.model.num_stages:
      raise pr.StateError(f"stage {k} out of range")
    import jax
    from asymml_jax import precision
    sig = self.sigs[True][k]
    scalar = jax.ShapeDtypeStruct((), precision.float_dtype())
    ins = self._read(msg, {"drs": ("residual_gradient", sig["rs"]),
                           "dloss": ("loss_gradient", scalar)})
    t0 = time.perf_counter()
    dyr, dparams = jax.device_get(self.executor.backward(msg.tag, k, ins["drs"] or {},
                                                         ins["dloss"]))
    dt = time.perf_counter() - t0
    self.compute_seconds += dt
    cls = "output_gradient_residual" if self.plan.protects_gradients else "output_gradient"
    return {"compute_s": dt}, self._write([("dyr", cls, dyr),
                                           ("dparams", "trusted_weight_gradient", dparams)])

  def _on_end(self, msg: pr.Message):
    self.executor.end(msg.tag)
    self.train_tags.pop(msg.tag, None)
    return {}, ()

  def _on_whole_step(self, msg: pr.Message):
    import jax
    if self.backend != "tee_only":
      raise pr.StateError("WHOLE_STEP is the tee_only backend's")
    train = self._train_flag(msg.tag)
    tag, batch = self._whole_batch
    if tag != msg.tag:
      raise pr.StateError(f"step {msg.tag} was not begun")
    v = self.variables
    ins = self._read(msg, {"params": ("public_weights", v["params"]),
                           "stats": ("public_batch_stats", v["batch_stats"])})
    t0 = time.perf_counter()
    if train:
      loss, grads, new_stats, metrics = jax.device_get(
          self.whole.grads(ins["params"], ins["stats"], batch, msg.tag))
      out = [("loss", "loss", loss), ("grads", "whole_gradient", grads),
             ("stats", "batch_statistics", new_stats), ("metrics", "metrics", metrics)]
    else:
      metrics = jax.device_get(self.whole.evaluate(ins["params"], ins["stats"], batch,
                                                   -1 - msg.tag))
      out = [("metrics", "metrics", metrics)]
    dt = time.perf_counter() - t0
    self.compute_seconds += dt
    return {"compute_s": dt}, self._write(out)

  def _on_stats(self, msg: pr.Message):
    tensors = ()
    if msg.meta.get("ranks"):
      if getattr(self, "executor", None) is None:
        raise pr.StateError("no plan yet: HELLO first")
      tensors = self._write([("ranks", "site_ranks", site_ranks(self.executor.plan))])
    return {"compute_s_total": self.compute_seconds, "copy_s_total": self.copy_seconds,
            "overlap_s_total": self.overlap_seconds,
            "calls": self.calls, "poisson_truncated_steps": getattr(self, "truncated_steps", 0),
            "traffic_in": self.traffic_in.summary(),
            "traffic_out": self.traffic_out.summary(),
            "open_steps": list(getattr(self, "executor", None).open_steps
                               if getattr(self, "executor", None) else [])}, tensors

  def _on_shutdown(self, msg: pr.Message):
    self.shutdown = True
    return {}, ()

  def close(self) -> None:
    if self.arena is not None:
      self.arena.close()


def site_ranks(plan) -> dict[str, np.ndarray]:
  """The static rank of every split site, as the STATS reply carries it (``site_ranks``)."""
  return {site: np.asarray(sp.r_max, np.int32) for site, sp in plan.sites.items() if sp.split}


def serve(server: EnclaveServer, channel: Channel) -> None:
  """Answers frames until the peer goes away or asks to shut down."""
  while not server.shutdown:
    try:
      body = channel.recv(timeout=None)
    except (ChannelClosed, ConnectionError, OSError):
      return
    except pr.ProtocolError as e:  # an oversized length prefix: answer, then drop
      channel.send(pr.encode(pr.error_message(0, 0, 0, e)))
      return
    channel.send(server.handle(body))
    if server.drop_peer:
      return
    server.after_reply()


_MAX_PEERS = 64  # connections that may fail to authenticate before the enclave gives up


def serve_listener(server: EnclaveServer, listener) -> bool:
  """Serves the first peer that authenticates; returns whether one did.

  A peer that fails HELLO's proof is dropped and the next connection is
  accepted, so a stray local process can neither drive nor block the enclave.
  """
  for _ in range(_MAX_PEERS):
    conn, _ = listener.accept()
    server.next_seq, server.drop_peer = 0, False
    channel = Channel(conn)
    try:
      serve(server, channel)
    finally:
      channel.close()
    if not server.drop_peer:
      return True
  return False


def main(argv: list[str] | None = None) -> int:
  import argparse
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--transport", choices=transport.TRANSPORTS, default="unix")
  p.add_argument("--socket", default="", help="the Unix socket's path (transport=unix)")
  p.add_argument("--sealed", required=True)
  p.add_argument("--key", required=True)
  p.add_argument("--threads", type=int, default=1)
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  allocator.reuse_freed_memory()  # every backend alike: tee_only and enclave
  from enclave_bridge import seal
  try:
    key = seal.read_key_file(args.key)
    ds = seal.unseal_dataset(args.sealed, args.key)
  except (seal.SealError, FileNotFoundError) as e:
    print(f"enclave: cannot open the sealed data set: {e}", file=sys.stderr, flush=True)
    return 2
  try:
    secret = auth.take_secret()
    if secret is None and args.transport == "tcp":
      raise ValueError(f"the tcp transport needs the launch secret in {auth.SECRET_ENV}")
    listener, address = transport.listen(args.transport, args.socket)
  except (ValueError, OSError) as e:
    print(f"enclave: cannot listen: {e}", file=sys.stderr, flush=True)
    return 2
  server = EnclaveServer(ds, key, secret)
  print(f"{transport.READY_PREFIX}{address} (pid {os.getpid()}, {len(ds.train_labels)} "
        f"train / {len(ds.test_labels)} test samples)", file=sys.stderr, flush=True)
  try:
    if not serve_listener(server, listener):
      print(f"enclave: {_MAX_PEERS} connections failed to authenticate; exiting",
            file=sys.stderr, flush=True)
      return 3
  finally:
    server.close()
    listener.close()
    if args.transport == "unix" and os.path.exists(args.socket):
      os.unlink(args.socket)
  return 0


if __name__ == "__main__":
  sys.exit(main())

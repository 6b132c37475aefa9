"""The untrusted side of the bridge: a client and the ``enclave`` / ``tee_only`` backends.

:class:`BridgeClient` sends validated frames over the control socket, puts
tensors in the shared-memory arena, checks every reply against the boundary
ledger and the shapes it expects, and turns a dead or hung enclave into a
typed error (:class:`EnclaveDied`, :class:`EnclaveTimeout`) within a bounded
time instead of a hang.

:class:`EnclaveBackend` is :class:`asymml_jax.backends.HostBackend` over the
bridge: one jitted untrusted program per step whose inputs are the step number
and the public weights; each trusted stage is a ``jax.custom_vjp`` whose
forward and backward call the enclave.  :class:`TeeOnlyBackend` runs the whole
model in the enclave (the TEE-only baseline).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from asymml_jax import backends as bk
from asymml_jax import faults, precision
from asymml_jax import stages as st
from asymml_jax.models.base import StagedModel
from asymml_jax.plan import Plan
from enclave_bridge import auth
from enclave_bridge import ledger as lg
from enclave_bridge import protocol as pr
from enclave_bridge.transport import Arena, Channel, ChannelClosed, receive, send_parts
from enclave_bridge.watchdog import ProgressWatchdog

Op = pr.Op


class EnclaveDied(faults.TrustedSideFault):
  """The enclave process exited or closed the connection."""


class EnclaveTimeout(faults.TrustedSideFault):
  """The enclave did not answer within the call timeout."""


class EnclaveHung(EnclaveTimeout):
  """Neither process made progress for ``bridge.watchdog_s`` while a call was in flight."""


def describe_exit(returncode: int | None) -> str:
  """``"died (SIGKILL)"``, ``"exited with code 2"`` or ``"has exited"``."""
  if returncode is None:
    return "has exited"
  if returncode < 0:
    try:
      return f"died ({signal.Signals(-returncode).name})"
    except ValueError:
      return f"died (signal {-returncode})"
  return f"exited with code {returncode}"


def describe_call(op: Op, tag: int, stage: int) -> str:
  """``"FORWARD stage 3 of step 12"`` (negative tags are evaluation batches)."""
  where = f"step {tag}" if tag >= 0 else f"evaluation batch {-1 - tag}"
  return f"{op.name} stage {stage} of {where}" if op in (Op.FORWARD, Op.BACKWARD) else (
      f"{op.name} of {where}")


class BridgeClient:
  """Request/reply calls to the enclave process.

  Args:
    address: the enclave's control socket: a Unix path or ``tcp://127.0.0.1:PORT``.
    alive: returns False once the enclave process is gone (for fast failure).
    region_bytes: size of each arena region.
    call_timeout: seconds one call may take before :class:`EnclaveTimeout`.
    recorder: optional ``recorder(kind, payload)`` called with every received
      frame (``"frame"``, bytes) and tensor (``"tensor"``, (desc, array)).
    exit_status: the enclave's exit status once it is gone (for the message).
    watchdog: turns a call during which neither side progresses into
      :class:`EnclaveHung` (``watchdog.py``).
  """

  def __init__(self, address: str, *, alive: Callable[[], bool] = lambda: True,
               region_bytes: int = 256 << 20, call_timeout: float = 600.0,
               connect_timeout: float = 60.0,
               recorder: Callable[[str, Any], None] | None = None,
               exit_status: Callable[[], int | None] = lambda: None,
               watchdog: ProgressWatchdog | None = None):
    self.alive, self.call_timeout, self.recorder = alive, call_timeout, recorder
    self.exit_status, self.watchdog = exit_status, watchdog
    self.channel = Channel.connect(address, timeout=connect_timeout)
    self.arena = Arena.create(region_bytes)
    self.seq = 0
    self.traffic_out, self.traffic_in = lg.Traffic(), lg.Traffic()
    self.timing = {"calls": 0, "call_s": 0.0, "server_s": 0.0, "compute_s": 0.0,
                   "client_copy_s": 0.0, "overlap_s": 0.0}
    # The same counters per ``"<op>/<stage>"`` (per-layer breakdowns, DESIGN section 8).
    self.stage_timing: dict[str, dict[str, float]] = {}

  def _recv(self) -> bytes:
    deadline = time.monotonic() + self.call_timeout
    while True:
      try:
        return self.channel.recv(timeout=0.25)
      except socket.timeout:
        if not self.alive():
          raise EnclaveDied(f"the enclave process {describe_exit(self.exit_status())}") from None
        if self.watchdog is not None and self.watchdog.stalled():
          raise EnclaveHung(f"the enclave hangs: {self.watchdog.report()}") from None
        if time.monotonic() > deadline:
          raise EnclaveTimeout(f"no answer from the enclave within {self.call_timeout:.0f} s") from None
      except (ChannelClosed, ConnectionError) as e:
        raise EnclaveDied(self._closed_reason(e)) from None

  def _closed_reason(self, error: BaseException) -> str:
    """Why the socket closed: the process's death if it follows within 1 s."""
    for _ in range(20):
      if not self.alive():
        return f"the enclave process {describe_exit(self.exit_status())}"
      time.sleep(0.05)
    return f"the enclave closed the connection ({error})"

  def call(self, op: Op, *, tag: int = 0, stage: int = 0, meta: Mapping | None = None,
           parts: tuple = (), expect: Mapping[str, Any] | None = None
           ) -> tuple[dict, dict[str, Any]]:
    """One request/reply.

    Args:
      parts: ``(prefix, class, tree)`` triples to send.
      expect: ``{prefix: (ledger class, template)}`` the reply's tensors must match
        exactly.

    Returns:
      ``(reply metadata, {prefix: rebuilt tree})``.
    """
    t0 = time.perf_counter()
    descs = send_parts(self.arena, "request", parts, lg.TO_ENCLAVE, self.traffic_out)
    seq = self.seq
    self.seq += 1
    t1 = time.perf_counter()
    # sent_at: lets the enclave tell how much of its deferred work (the
    # overlap, DESIGN section 3 step 3) this request did not wait for.
    frame = pr.encode(pr.Message(op, seq, tag, stage,
                                 dict(meta or {}, sent_at=time.monotonic()), descs))
    try:
      self.channel.send(frame)
    except socket.timeout:
      raise EnclaveTimeout("the enclave stopped reading requests") from None
    except OSError as e:  # EPIPE / ECONNRESET: the enclave is gone
      raise EnclaveDied(f"the enclave closed the connection ({e})") from None
    dog = self.watchdog
    if dog is not None:
      dog.waiting_for = describe_call(op, tag, stage)
    try:
      body = self._recv()
    finally:
      if dog is not None:
        dog.waiting_for = ""
        dog.beat()
    t2 = time.perf_counter()
    if self.recorder is not None:
      self.recorder("frame", body)
    msg = pr.decode(body)
    if msg.op == Op.ERROR:
      pr.raise_error(msg)
    if msg.op != Op.REPLY or msg.seq != seq:
      raise pr.OutOfOrder(f"reply {msg.op.name} #{msg.seq} to request #{seq}")
    out = receive(self.arena, "reply", msg.tensors, dict(expect or {}), lg.TO_UNTRUSTED,
                  self.traffic_in, recorder=self.recorder)
    t3 = time.perf_counter()
    # Deferred trusted work this call waited for is trusted compute on its
    # critical path; the part that overlapped the untrusted side is ``overlap_s``.
    exposed = float(msg.meta.get("deferred_exposed_s", 0.0))
    sample = {"calls": 1, "call_s": t3 - t0,
              "server_s": float(msg.meta.get("server_s", 0.0)) + exposed,
              "compute_s": float(msg.meta.get("compute_s", 0.0)) + exposed,
              "client_copy_s": (t1 - t0) + (t3 - t2),
              "overlap_s": float(msg.meta.get("overlap_s", 0.0))}
    per_stage = self.stage_timing.setdefault(f"{op.name.lower()}/{stage}",
                                             dict.fromkeys(sample, 0.0))
    for name, value in sample.items():
      self.timing[name] += value
      per_stage[name] += value
    return msg.meta, out

  def close(self) -> None:
    try:
      self.channel.send(pr.encode(pr.Message(Op.SHUTDOWN, self.seq, 0, 0, {}, ())))
      self.seq += 1
      self.channel.sock.settimeout(2.0)
      self.channel.recv(timeout=2.0)
    except Exception:  # noqa: BLE001 - best effort on the way out
      pass
    self.channel.close()
    self.arena.close()


# ------------------------------------------------------------------ backends
def output_gradient_class(plan: Plan) -> str:
  """Ledger class of the output gradients a plan releases (section 3, "Backward")."""
  return "output_gradient_residual" if plan.protects_gradients else "output_gradient"


def _hello_config(backend: str, model: StagedModel, plan: Plan, options: Mapping) -> dict:
  return {"backend": backend, "model": model.name, "width": model.width, "norm": model.norm,
          "decomposition": dict(plan.decomposition.__dict__),
          "privacy": dict(plan.privacy.__dict__),
          "expected_batch_size": plan.expected_batch_size,
          "batch_size": plan.batch_size,
          "eval_batch_size": int(options.get("eval_batch_size", plan.batch_size)),
          "seed": int(options.get("seed", 0)),
          "augment_flip": bool(options.get("augment_flip", False)),
          "augment_crop": int(options.get("augment_crop", 0)),
          "residual_dtype": str(options.get("residual_dtype_name", "float32")),
          "dtype": precision.float_dtype().name,
          "modes": {s: p.mode for s, p in plan.sites.items()}}


class _EnclaveConnection:
  """Starts (or attaches to) the enclave process and says HELLO."""

  def _connect(self, backend: str, model: StagedModel, plan: Plan, options: Mapping):
    from enclave_bridge import launcher
    opts = dict(options)
    # Folders made here (not the caller's) are removed again by close().
    self._own_dirs: list[str] = []
    self._workdir = opts.get("workdir") or self._own_dir("asymml-enclave-")
    os.makedirs(self._workdir, exist_ok=True)
    transport = opts.get("transport") or None
    socket_path = "" if transport == "tcp" else opts.get("socket_path") or os.path.join(
        self._own_dir("asymml-sock-"), "enclave.sock")
    for name in ("sealed_path", "key_path"):
      if not opts.get(name):
        raise ValueError(f"the {backend} backend needs bridge.{name} (see `python -m "
                         "enclave_bridge.seal --help`)")
      if not os.path.exists(opts[name]):
        raise FileNotFoundError(f"bridge.{name}: {opts[name]} does not exist")
    spec = launcher.EnclaveSpec(mode=opts.get("mode", "subprocess"), transport=transport,
                                socket_path=socket_path,
                                sealed_path=opts["sealed_path"], key_path=opts["key_path"],
                                threads=int(opts.get("threads", 1)), workdir=self._workdir)
    self.watchdog = ProgressWatchdog(lambda: getattr(getattr(self, "process", None), "pid", None),
                                     float(opts.get("watchdog_s", 30.0)))
    self.process = launcher.EnclaveProcess(spec).start(timeout=float(opts.get("start_timeout", 120)))
    try:
      self.client = BridgeClient(self.process.address, alive=lambda: self.process.alive(),
                                 region_bytes=int(opts.get("arena_mb", 256)) << 20,
                                 call_timeout=float(opts.get("call_timeout", 600)),
                                 recorder=opts.get("recorder"),
                                 exit_status=lambda: self.process.returncode,
                                 watchdog=self.watchdog)
      hello = _hello_config(backend, model, plan, opts)
      self.client.arena.wide_floats = hello["dtype"] == "float64"
      hello.update(arena=self.client.arena.name, region=self.client.arena.region,
                   **auth.hello_fields(self.process.secret))
      self.info, _ = self.client.call(Op.HELLO, meta=hello)
      auth.check_reply(self.process.secret, hello, self.info)
    except BaseException:
      self.process.stop()
      self._remove_own_dirs(keep=(self._workdir,))
      raise
    if tuple(self.info["image_shape"]) != tuple(model.input_shape):
      self.close()
      raise ValueError(f"the sealed data has images of shape {self.info['image_shape']}, "
                       f"the model expects {model.input_shape}")

  def close(self) -> None:
    if getattr(self, "watchdog", None) is not None:
      self.watchdog.close()
    client = getattr(self, "client", None)
    if client is not None:
      client.close()
      self.client = None
    proc = getattr(self, "process", None)
    died_by_itself = proc is not None and not proc.alive()
    if proc is not None:
      proc.stop()
    # An enclave that died on its own keeps its log folder for the post-mortem.
    self._remove_own_dirs(keep=(self._workdir,) if died_by_itself else ())

  def _own_dir(self, prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    self._own_dirs.append(path)
    return path

  def _remove_own_dirs(self, keep: tuple[str, ...] = ()) -> None:
    for path in getattr(self, "_own_dirs", ()):
      if path not in keep:
        shutil.rmtree(path, ignore_errors=True)
    self._own_dirs = []

  def breakdown(self) -> dict[str, float]:
    t = self.client.timing if getattr(self, "client", None) else {}
    return dict(t)

  def site_ranks(self) -> dict[str, int]:
    """The enclave's static rank per split site (``site_ranks`` in the ledger)."""
    template = {site: jax.ShapeDtypeStruct((), np.int32) for site in bk.plan_ranks(self.plan)}
    _, out = self.client.call(Op.STATS, meta={"ranks": True},
                              expect={"ranks": ("site_ranks", template)})
    return {site: int(r) for site, r in (out["ranks"] or {}).items()}

  def ledger_summary(self) -> dict[str, list]:
    c = self.client
    return {"to_enclave": c.traffic_out.summary(), "to_untrusted": c.traffic_in.summary()}

  def traffic_classes(self) -> set[str]:
    return self.client.traffic_in.classes() | self.client.traffic_out.classes()


class EnclaveBackend(_EnclaveConnection, bk.HostBackend):
  """``enclave``: the trusted half in the enclave process, behind host callbacks."""

  def __init__(self, model: StagedModel, plan: Plan, key: jax.Array, **options):
    del key  # the enclave derives its own key; the untrusted side never has it
    residual_dtype = options.pop("residual_dtype", None)
    if residual_dtype is not None:
      options["residual_dtype_name"] = np.dtype(residual_dtype).name
    # One enclave serves the host's whole shard set: one callback per stage
    # for the whole batch, residuals re-sharded over the mesh (DESIGN section 10).
    bk.HostBackend.__init__(self, model, plan, name="enclave", residual_dtype=residual_dtype,
                            mesh=options.pop("mesh", None))
    self._sigs: dict[tuple[bool, int], list] = {}
    self._train_of: dict[int, bool] = {}
    self._connect("enclave", model, plan, options)

  def _signatures(self, train: bool, batch_size: int):
    if (train, batch_size) not in self._sigs:
      self._sigs[(train, batch_size)] = st.stage_signatures(
          self.model, self.plan, batch_size, train, self._residual_dtype, boundary=True)
    return self._sigs[(train, batch_size)]

  def _begin(self, tag, batch, train):
    if batch is not None:
      raise ValueError("the enclave backend samples its own batches: pass batch=None")
    meta, _ = self.client.call(Op.BEGIN, tag=tag, meta={"train": train,
                                                       "index": -1 - tag if tag < 0 else 0})
    self._train_of[tag] = (train, int(meta["batch_size"]))
    self.watchdog.arm()
    # Outside the jitted step: building the signatures runs JAX, which a callback
    # on a multi-device CPU mesh must not (asymml_jax.parallel, "CPU meshes").
    self._signatures(train, int(meta["batch_size"]))
    return int(meta["batch_size"])

  def _end(self, tag):
    if self._train_of.pop(tag, None) is not None:
      self.watchdog.disarm()
    if getattr(self, "client", None) is not None:
      try:
        self.client.call(Op.END, tag=tag)
      except (EnclaveDied, EnclaveTimeout, pr.ProtocolError, OSError):
        pass

  def _host_forward(self, k, tag, yr, params_k, stats_k):
    train, n = self._train_of[tag]
    sig = self._signatures(train, n)[k]
    expect = {"rs": ("activation_residual", sig["rs"]),
              "stats": ("batch_statistics", sig["new_stats"])}
    if sig["loss"] is not None:
      expect.update(loss=("loss", sig["loss"]), metrics=("metrics", sig["metrics"]))
    _, out = self.client.call(
        Op.FORWARD, tag=tag, stage=k, expect=expect,
        parts=(("yr", "conv_output_residual", yr), ("params", "public_weights", params_k),
               ("stats", "public_batch_stats", stats_k)))
    return (out["rs"] or {}, out.get("loss"), out.get("metrics"), out["stats"] or {})

  def _host_backward(self, k, tag, drs, dloss):
    train, n = self._train_of[tag]
    sig = self._signatures(train, n)[k]
    _, out = self.client.call(
        Op.BACKWARD, tag=tag, stage=k,
        expect={"dyr": (output_gradient_class(self.plan), sig["yr"]),
                "dparams": ("trusted_weight_gradient", sig["params"])},
        parts=(("drs", "residual_gradient", drs),
               ("dloss", "loss_gradient", np.asarray(dloss, precision.float_dtype()))))
    return out["dyr"] or {}, out["dparams"]

  def breakdown(self) -> dict[str, float]:
    t = super().breakdown()
    if not t:
      return t
    server_copy = max(0.0, t["server_s"] - t["compute_s"])
    return {"steps_wall_s": self.wall_seconds,
            "trusted_compute_s": t["compute_s"] + t["overlap_s"],
            "overlap_s": t["overlap_s"],
            "transfer_s": t["client_copy_s"] + server_copy,
            "waiting_s": max(0.0, t["call_s"] - t["server_s"] - t["client_copy_s"]),
            "untrusted_compute_s": max(0.0, self.wall_seconds - t["call_s"]),
            "bridge_calls": t["calls"]}

  def summary_extras(self) -> dict:
    return {"breakdown": self.breakdown(), "ledger": self.ledger_summary(),
            "enclave": {"pid": self.info.get("pid"), "mode": "subprocess"}}


class TeeOnlyBackend(_EnclaveConnection, bk.Backend):
  """``tee_only``: the whole model in the enclave process (the TEE-only baseline)."""

  def __init__(self, model: StagedModel, plan: Plan, key: jax.Array, **options):
    del key
    mesh = options.pop("mesh", None)
    if mesh is not None and mesh.devices.size > 1:
      raise ValueError("the tee_only backend runs the whole model in the enclave: there is "
                       "no accelerator work to split over a mesh of "
                       f"{mesh.devices.size} devices")
    if options.get("residual_dtype") is not None:
      raise ValueError("the tee_only backend releases no residuals: residual_dtype does "
                       "not apply to it")
    options.pop("residual_dtype", None)
    self.name, self.model, self.plan = "tee_only", model, plan
    self._variables = jax.eval_shape(model.init, jax.random.key(0))
    self._connect("tee_only", model, plan, options)

  def _whole(self, params, stats, tag: int, train: bool):
    self.client.call(Op.BEGIN, tag=tag, meta={"train": train,
                                              "index": -1 - tag if tag < 0 else 0})
    self.watchdog.arm()
    try:
      v = self._variables
      scalar = jax.ShapeDtypeStruct((), precision.float_dtype())
      expect = {"metrics": ("metrics", {k: scalar for k in ("correct", "count", "loss_sum")})}
      if train:
        expect.update(loss=("loss", scalar), grads=("whole_gradient", v["params"]),
                      stats=("batch_statistics", v["batch_stats"]))
      _, out = self.client.call(Op.WHOLE_STEP, tag=tag, expect=expect,
                                parts=(("params", "public_weights", params),
                                       ("stats", "public_batch_stats", stats)))
      return out
    finally:
      self.watchdog.disarm()
      self.client.call(Op.END, tag=tag)

  def grads(self, params, stats, batch, step):
    if batch is not None:
      raise ValueError("the tee_only backend samples its own batches: pass batch=None")
    out = self._whole(jax.device_get(params), jax.device_get(stats), int(step), True)
    return out["loss"], out["grads"], out["stats"] or {"stages": {}}, out["metrics"]

  def evaluate(self, params, stats, batch, index):
    if batch is not None:
      raise ValueError("the tee_only backend samples its own batches: pass batch=None")
    return self._whole(jax.device_get(params), jax.device_get(stats), -1 - int(index),
                       False)["metrics"]

  def summary_extras(self) -> dict:
    return {"breakdown": self.breakdown(), "ledger": self.ledger_summary()}

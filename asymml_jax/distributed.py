r"""Several hosts, one enclave each, joined by ``jax.distributed`` (DESIGN section 10).

Each *process* (normally one per host) runs the untrusted program on its own
accelerator(s) and starts its own enclave, which holds its own sealed *shard*
of the training set (shard ``i`` of ``n``: every ``n``-th example from the
``i``-th on, :func:`asymml_jax.data.shard_dataset`; disjoint and
deterministic).  The processes are joined by JAX's own distributed runtime:
``jax.distributed.initialize`` with process 0 hosting the coordination
service; nothing here does its own networking or its own arithmetic.

**Averaging (XLA).**  :class:`ProcessGroup` builds a global
``jax.sharding.Mesh`` with one axis, ``"processes"``, holding one device per
process.  A per-process value ``x`` becomes row ``i`` of a global array of
shape ``(P, *x.shape)`` (``jax.make_array_from_single_device_arrays``), and a
jitted ``mean``/``sum`` over that axis with a replicated output sharding
makes XLA emit the all-reduce (gloo on CPU, NCCL on GPU).  Every process gets
bit-identical results, so gradients, batch statistics, losses and metrics are
averaged (or summed) identically everywhere and every process applies the
same optimizer update: parameters stay identical across hosts (the run's
summary records a digest per process to show it).  ``broadcast`` is
``jax.experimental.multihost_utils.broadcast_one_to_all``.

**Batch and accounting (DESIGN section 7).**  ``config.batch_size`` is the
*global* batch ``B`` (:class:`GlobalBatch`).  With shuffling each process
takes ``B / P`` examples of its shard per step.  With Poisson sampling every
enclave includes each example of its shard independently with the *global*
rate ``q = B / N`` (``N``: all shards together), i.e. an expected ``q n_i``
examples: the union over processes is exactly a Poisson sample of rate ``q``
of the global data set, which is what the accountant is told (``q``, the
number of steps); the noise multiplier calibrated from a target epsilon is
therefore the same on every process.  Each process samples with its own seed
(:meth:`Group.process_seed`): otherwise, with one sealing key, two enclaves
would add identical noise to different examples, and the difference of two
releases would be noise-free.

**Failure protocol.**  Collectives cannot see a failed peer: a process whose
enclave died would leave the others blocked in an all-reduce.  So every
collective is preceded by an *arrival* step on the coordination service's
key-value store: process ``i`` writes ``asymml/arrive/<k>/<i> = label`` for
its ``k``-th collective and polls until all ``P`` keys exist (a few
milliseconds per step), checking the labels agree (processes out of step,
e.g. with different configs, are an error rather than a hang).  A process
that fails (any exception inside :meth:`Group.guard`, e.g.
``enclave_bridge.client.EnclaveDied``) first writes the key
``asymml/abort`` with ``{process, host, position, error}`` and then unwinds
normally (closing its enclave).  A watcher thread in every process blocks on
that key; once it appears, the main thread raises :class:`PeerFailed`
(naming the failed process, where it was and why) at its next arrival, closes
its own enclave and exits; all processes then meet in JAX's shutdown barrier
and exit cleanly.  If a process cannot get there within
``abort_timeout_s`` (e.g. it is inside a long compilation), the watcher
prints the same message and ends it with ``os._exit`` (its enclave dies with
it: the launcher sets ``PR_SET_PDEATHSIG``).  A process that dies without a
word (SIGKILL, a crash) is detected by the coordination service's heartbeat
(``heartbeat_timeout_s``), which terminates the others.  Every process
therefore stops within ``abort_timeout_s`` plus a poll (about 20 s by
default) of a reported failure; in practice within a step (killing one of two
enclaves on a 2-core host stopped both processes about 2 s later).

**Checkpoints.**  Only process 0 writes checkpoints and ``summary.json``
(orbax with ``active_processes={0}``, host numpy arrays); on a restart it
restores the latest checkpoint and broadcasts the step and state to all
processes, so every process resumes from the same shared checkpoint even when
the others cannot read its disk.

This module is pure library: it never imports ``enclave_bridge``.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

#: Name of the mesh axis that runs over the processes.
AXIS = "processes"
#: Prefix of every key this module writes to the coordination service.
KEY_PREFIX = "asymml"
ABORT_KEY = f"{KEY_PREFIX}/abort"
#: Exit status of a process stopped because *another* process failed.
EXIT_PEER_FAILED = 75
#: Exit status of the process whose own step failed.
EXIT_FAILED = 1

Tree = Any


class DistributedError(RuntimeError):
  """Base class of the errors of a process group."""


class PeerFailed(DistributedError):
  """Another process reported a failure; this one stops too.

  Attributes:
    process_id: the process that failed.
    cause: its error, ``"Type: message"``.
    position: where it was (the last collective it completed).
  """

  def __init__(self, record: dict[str, Any], me: int, num_processes: int):
    self.process_id = int(record.get("process", -1))
    self.cause = str(record.get("error", "unknown error"))
    self.position = str(record.get("position", "?"))
    host = record.get("host")
    super().__init__(
        f"process {self.process_id} of {num_processes}"
        + (f" (host {host})" if host else "")
        + f" failed after {self.position}: {self.cause}; stopping process {me} too")


class PeerLost(DistributedError):
  """Some process neither reached a collective nor reported a failure in time."""


class OutOfStep(DistributedError):
  """The processes issued different collectives (e.g. they run different configs)."""


def _one_line(text: str, limit: int = 2000) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def describe_error(error: BaseException) -> str:
  """``"Type: message"`` on one line (what :class:`PeerFailed` reports)."""
  msg = _one_line(str(error))
  return f"{type(error).__name__}: {msg}" if msg else type(error).__name__


# ------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True, kw_only=True)
class MultihostConfig:
  """Validated settings of one process of a multi-host run (DESIGN section 10).

  Attributes:
    coordinator_address: ``host:port`` where process 0 serves (and every
      process finds) the coordination service.
    num_processes: ``P``, processes in the run (normally one per host).
    process_id: this process, in ``[0, P)``; process 0 hosts the coordinator
      and writes checkpoints and the summary.
    abort_timeout_s: after any process reports a failure, every process stops
      within this many seconds (cleanly if it can, by ``os._exit`` if not).
    heartbeat_timeout_s: the coordination service declares a silent process
      dead after this many seconds and stops the others (crashes, SIGKILL).
    step_timeout_s: longest wait for the other processes at one collective
      when none has failed (covers compilation and the slowest step).
    init_timeout_s: longest wait for every process to join.
  """

  coordinator_address: str
  num_processes: int
  process_id: int
  abort_timeout_s: float = 20.0
  heartbeat_timeout_s: int = 20
  step_timeout_s: float = 1800.0
  init_timeout_s: int = 300

  def __post_init__(self):
    def need(cond: bool, msg: str):
      if not cond:
        raise ValueError(f"multihost config: {msg}")

    def is_int(v):
      return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    addr = self.coordinator_address
    need(isinstance(addr, str) and ":" in addr,
         f"coordinator_address must be 'host:port', got {addr!r}")
    host, port = addr.rsplit(":", 1)
    need(bool(host.strip("[]")), f"coordinator_address {addr!r} has no host")
    need(port.isdigit() and 1 <= int(port) <= 65535,
         f"coordinator_address {addr!r}: port must be in [1, 65535]")
    need(is_int(self.num_processes) and 1 <= self.num_processes <= 65536,
         f"num_processes must be an integer in [1, 65536], got {self.num_processes!r}")
    need(is_int(self.process_id) and 0 <= self.process_id < self.num_processes,
         f"process_id must be an integer in [0, num_processes={self.num_processes}), "
         f"got {self.process_id!r}")
    need(0 < self.abort_timeout_s <= 600,
         f"abort_timeout_s must be in (0, 600], got {self.abort_timeout_s}")
    need(is_int(self.heartbeat_timeout_s) and 2 <= self.heartbeat_timeout_s <= 3600,
         f"heartbeat_timeout_s must be an integer in [2, 3600], got {self.heartbeat_timeout_s!r}")
    need(self.step_timeout_s >= 1, f"step_timeout_s must be >= 1, got {self.step_timeout_s}")
    need(is_int(self.init_timeout_s) and self.init_timeout_s >= 1,
         f"init_timeout_s must be an integer >= 1, got {self.init_timeout_s!r}")


# ------------------------------------------------------- global batch, data
@dataclasses.dataclass(frozen=True, kw_only=True)
class GlobalBatch:
  """How a global batch of ``B`` examples splits over ``P`` data shards (sections 7, 10).

  Attributes:
    batch_size: ``B``, the global (expected, with Poisson sampling) batch.
    shard_sizes: ``n_i``, the training examples of each process's shard.
    process_id: this process.
  """

  batch_size: int
  shard_sizes: tuple[int, ...]
  process_id: int = 0

  def __post_init__(self):
    sizes = tuple(int(n) for n in self.shard_sizes)
    object.__setattr__(self, "shard_sizes", sizes)
    if not sizes or min(sizes) < 1:
      raise ValueError(f"every data shard needs at least one training example, got {sizes}")
    if not 0 <= self.process_id < len(sizes):
      raise ValueError(f"process_id {self.process_id} out of range for {len(sizes)} shards")
    if not 1 <= self.batch_size <= self.num_train:
      raise ValueError(f"config: batch_size {self.batch_size} exceeds the {self.num_train} "
                       "training examples" + (f" of all {len(sizes)} shards" if len(sizes) > 1
                                              else ""))

  @property
  def num_processes(self) -> int:
    return len(self.shard_sizes)

  @property
  def num_train(self) -> int:
    """``N``: the training examples of all shards."""
    return sum(self.shard_sizes)

  @property
  def local_num_train(self) -> int:
    return self.shard_sizes[self.process_id]

  @property
  def sampling_rate(self) -> float:
    """``q = B / N``, the global sampling rate the accountant uses."""
    return self.batch_size / self.num_train

  @property
  def steps_per_epoch(self) -> int:
    return max(1, self.num_train // self.batch_size)

  @property
  def local_batch_size(self) -> int:
    """This process's share ``B / P`` of a shuffled batch.

    Raises:
      ValueError: ``B`` is not a multiple of ``P``, or a shard is smaller
        than its share.
    """
    p = self.num_processes
    if self.batch_size % p:
      raise ValueError(f"config: batch_size {self.batch_size} (the global batch) must be a "
                       f"multiple of the {p} processes")
    local = self.batch_size // p
    if local > min(self.shard_sizes):
      raise ValueError(f"config: each process takes {local} examples per step but a shard "
                       f"has only {min(self.shard_sizes)}")
    return local

  @property
  def local_expected_batch_size(self) -> float:
    """``q n_i``: this process's expected Poisson batch at the global rate ``q``."""
    return float(self.batch_size) * self.local_num_train / self.num_train

  def summary(self) -> dict[str, Any]:
    return {"num_processes": self.num_processes, "global_batch_size": self.batch_size,
            "num_train": self.num_train, "shard_sizes": list(self.shard_sizes),
            "sampling_rate": self.sampling_rate}


def process_seed(seed: int, process_id: int, num_processes: int) -> int:
  """The data and trusted-side seed of one process (the run seed when alone).

  ``P > 1`` processes get independent 63-bit seeds derived from
  ``(seed, process_id, P)`` by SHA-256, so no two enclaves sample or noise
  alike.  Deterministic, so a restarted run repeats its batches.
  """
  if num_processes == 1:
    return int(seed)
  digest = hashlib.sha256(f"asymml-process-seed:{int(seed)}:{int(process_id)}:"
                          f"{int(num_processes)}".encode()).digest()
  return int.from_bytes(digest[:8], "big") >> 1


def tree_digest(tree: Tree) -> str:
  """SHA-256 (hex) of a pytree's structure, dtypes, shapes and bytes."""
  h = hashlib.sha256()
  leaves, treedef = jax.tree_util.tree_flatten(jax.device_get(tree))
  h.update(str(treedef).encode())
  for leaf in leaves:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


# --------------------------------------------------------------------- groups
class Group(abc.ABC):
  """What the training loop needs from a set of cooperating processes."""

  process_id: int = 0
  num_processes: int = 1

  @property
  def is_primary(self) -> bool:
    """Process 0: writes checkpoints and the summary."""
    return self.process_id == 0

  @property
  def multi(self) -> bool:
    return self.num_processes > 1

  def process_seed(self, seed: int) -> int:
    """See :func:`process_seed`."""
    return process_seed(seed, self.process_id, self.num_processes)

  @abc.abstractmethod
  def all_reduce(self, mean: Tree = None, total: Tree = None, *,
                 label: str) -> tuple[Tree, Tree]:
    """``(mean over processes of mean, sum over processes of total)``."""

  @abc.abstractmethod
  def all_gather(self, x: Any, *, label: str) -> np.ndarray:
    """``(P, *x.shape)``: every process's ``x``, in process order."""

  @abc.abstractmethod
  def broadcast(self, tree: Tree, *, label: str) -> Tree:
    """Process 0's ``tree`` on every process (on its device)."""

  def assert_same(self, what: str, payload: bytes, *, label: str | None = None) -> None:
    """Raises :class:`DistributedError` unless every process passes the same ``payload``."""
    digest = np.frombuffer(hashlib.sha256(payload).digest(), np.uint8)
    rows = self.all_gather(digest, label=label or f"check {what}")
    differ = [i for i in range(len(rows)) if not np.array_equal(rows[i], rows[0])]
    if differ:
      raise DistributedError(f"the processes disagree on {what}: process(es) {differ} differ "
                             "from process 0 (start every process with the same settings)")

  @contextlib.contextmanager
  def guard(self) -> Iterator[None]:
    """Reports an exception raised inside to the other processes, then re-raises it."""
    yield

  def close(self) -> None:
    """Stops background work (before a normal exit)."""

  def describe(self) -> str:
    return "single process"


class LocalGroup(Group):
  """One process on its own: every collective is the identity."""

  def all_reduce(self, mean=None, total=None, *, label=""):
    del label
    return mean, total

  def all_gather(self, x, *, label=""):
    del label
    return np.asarray(x)[None]

  def broadcast(self, tree, *, label=""):
    del label
    return tree


#: The group of a run without ``jax.distributed``.
LOCAL = LocalGroup()


def _reduce(mean: Tree, total: Tree) -> tuple[Tree, Tree]:
  return (jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), mean),
          jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), total))


class ProcessGroup(Group):
  """The processes of one ``jax.distributed`` run (see the module docstring).

  Build it with :func:`initialize`.  Every process must issue the same
  collectives (:meth:`all_reduce`, :meth:`all_gather`, :meth:`broadcast`) in
  the same order with the same labels.

  Args:
    config: this process's settings.
    client: the coordination-service client of ``jax.distributed``.
  """

  def __init__(self, config: MultihostConfig, client: Any):
    self.config, self._client = config, client
    self.process_id, self.num_processes = config.process_id, config.num_processes
    if jax.process_count() != self.num_processes or jax.process_index() != self.process_id:
      raise DistributedError(
          f"jax.distributed reports process {jax.process_index()} of {jax.process_count()}, "
          f"the settings say {self.process_id} of {self.num_processes}")
    first = {}
    for d in sorted(jax.devices(), key=lambda d: d.id):
      first.setdefault(d.process_index, d)
    if sorted(first) != list(range(self.num_processes)):
      raise DistributedError(f"some processes have no device: {sorted(first)}")
    devices = [first[i] for i in range(self.num_processes)]
    self.device = devices[self.process_id]
    self.mesh = Mesh(np.array(devices), (AXIS,))
    self._rows = NamedSharding(self.mesh, PartitionSpec(AXIS))
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self._reduce = jax.jit(_reduce, out_shardings=replicated)
    self._gather = jax.jit(lambda x: x, out_shardings=replicated)
    self.position = "startup"  # the last collective completed (for failure reports)
    self._op = 0
    self._posted = False
    self._abort: dict[str, Any] | None = None
    self._aborted = threading.Event()
    self._closed = threading.Event()
    self._watcher = threading.Thread(target=self._watch, name="asymml-abort-watcher",
                                     daemon=True)
    self._watcher.start()
    atexit.register(self.close)

  # ------------------------------------------------------------- collectives
  def _global(self, x: Any) -> jax.Array:
    local = jnp.expand_dims(jax.device_put(x, self.device), 0)
    return jax.make_array_from_single_device_arrays(
        (self.num_processes, *local.shape[1:]), self._rows, [local])

  def _local(self, tree: Tree) -> Tree:
    return jax.tree_util.tree_map(lambda a: a.addressable_data(0), tree)

  def all_reduce(self, mean=None, total=None, *, label: str):
    """Mean of ``mean`` and sum of ``total`` over processes, by one XLA all-reduce.

    Returns:
      Trees of ``jax.Array`` on this process's device, identical on every process.
    """
    self._arrive(label)
    mean = {} if mean is None else mean
    total = {} if total is None else total
    m, t = self._reduce(jax.tree_util.tree_map(self._global, mean),
                        jax.tree_util.tree_map(self._global, total))
    out = self._local((m, t))
    self.position = label
    return out

  def all_gather(self, x, *, label: str) -> np.ndarray:
    self._arrive(label)
    out = np.asarray(self._gather(self._global(np.asarray(x))).addressable_data(0))
    self.position = label
    return out

  def broadcast(self, tree, *, label: str):
    from jax.experimental import multihost_utils
    self._arrive(label)
    out = multihost_utils.broadcast_one_to_all(tree, is_source=self.is_primary)
    self.position = label
    # Committed to this process's device, like every later state (no recompilation).
    return jax.device_put(out, self.device)

  # ------------------------------------------------------- arrival and abort
  def _arrive(self, label: str) -> None:
    """Waits until every process reaches this collective, or raises if one failed."""
    op = self._op
    self._op += 1
    folder = f"{KEY_PREFIX}/arrive/{op}/"
    self._raise_if_aborted()
    self._client.key_value_set(f"{folder}{self.process_id}", label)
    deadline = time.monotonic() + self.config.step_timeout_s
    delay = 0.0005
    while True:
      self._raise_if_aborted()
      entries = self._client.key_value_dir_get(folder)
      if len(entries) >= self.num_processes:
        break
      if time.monotonic() > deadline:
        seen = {int(k.rsplit("/", 1)[1]) for k, _ in entries}
        missing = [i for i in range(self.num_processes) if i not in seen]
        raise PeerLost(f"process(es) {missing} did not reach '{label}' within "
                       f"{self.config.step_timeout_s:g} s (and reported no failure)")
      time.sleep(delay)
      delay = min(2 * delay, 0.02)
    labels = {int(k.rsplit("/", 1)[1]): v for k, v in entries}
    if len(set(labels.values())) > 1:
      raise OutOfStep("the processes are out of step at collective "
                      f"#{op}: {dict(sorted(labels.items()))} (same config everywhere?)")
    if op and self.is_primary:  # everyone has left the previous collective's wait
      try:
        self._client.key_value_delete(f"{KEY_PREFIX}/arrive/{op - 1}/")
      except Exception:  # noqa: BLE001 - housekeeping only
        pass

  def _raise_if_aborted(self) -> None:
    if self._aborted.is_set():
      record = self._abort or {}
      if int(record.get("process", -1)) != self.process_id:
        raise PeerFailed(record, self.process_id, self.num_processes)

  def report_failure(self, error: BaseException) -> None:
    """Tells every process that this one failed with ``error`` (first report wins)."""
    if isinstance(error, PeerFailed) or self._posted:
      return
    self._posted = True
    record = {"process": self.process_id, "host": socket.gethostname(),
              "position": self.position, "error": describe_error(error),
              "time": time.time()}
    try:
      self._client.key_value_set(ABORT_KEY, json.dumps(record))
    except Exception:  # noqa: BLE001 - another process reported first, or no service
      pass

  @contextlib.contextmanager
  def guard(self) -> Iterator[None]:
    try:
      yield
    except BaseException as e:
      self.report_failure(e)
      raise

  def _watch(self) -> None:
    while not self._closed.is_set():
      try:
        value = self._client.blocking_key_value_get(ABORT_KEY, 250)
      except Exception as e:  # noqa: BLE001
        if "DEADLINE_EXCEEDED" in str(e).split("\n", 1)[0].upper():
          continue
        return  # the coordination service is shutting down
      try:
        record = json.loads(value)
      except ValueError:
        record = {"error": value}
      self._abort = record
      self._aborted.set()
      break
    else:
      return
    # Bounded stop: the main thread has abort_timeout_s to exit on its own.
    time.sleep(self.config.abort_timeout_s)
    if int(record.get("process", -1)) == self.process_id:
      msg = (f"process {self.process_id} of {self.num_processes} failed after "
             f"{record.get('position')}: {record.get('error')}")
      code = EXIT_FAILED
    else:
      msg = str(PeerFailed(record, self.process_id, self.num_processes))
      code = EXIT_PEER_FAILED
    print(f"error: {msg} (did not stop within {self.config.abort_timeout_s:g} s of the "
          "failure: exiting now)", file=sys.stderr, flush=True)
    try:
      sys.stdout.flush()
    finally:
      os._exit(code)

  def close(self) -> None:
    """Stops the abort watcher (called before a normal exit and at exit)."""
    if self._closed.is_set():
      return
    self._closed.set()
    if self._aborted.is_set():
      return  # the watcher now enforces the stop deadline; let it
    if self._watcher.is_alive() and self._watcher is not threading.current_thread():
      self._watcher.join(timeout=2.0)

  def describe(self) -> str:
    return (f"process {self.process_id} of {self.num_processes} (coordinator "
            f"{self.config.coordinator_address}, device {self.device})")


def initialize(config: MultihostConfig) -> ProcessGroup:
  """Joins the run with ``jax.distributed.initialize`` and returns its group.

  Must be called before any JAX computation in this process.  Process 0
  hosts the coordination service at ``config.coordinator_address``.

  Raises:
    DistributedError: already initialized, or the other processes did not
      join within ``init_timeout_s``.
  """
  from jax._src import distributed as jax_distributed
  if jax_distributed.global_state.client is not None:
    raise DistributedError("jax.distributed is already initialized in this process")
  try:
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes, process_id=config.process_id,
        initialization_timeout=config.init_timeout_s,
        heartbeat_timeout_seconds=config.heartbeat_timeout_s,
        shutdown_timeout_seconds=max(30, int(2 * config.abort_timeout_s)))
  except Exception as e:  # noqa: BLE001 - re-raised with the settings
    raise DistributedError(
        f"process {config.process_id} of {config.num_processes} could not join the run at "
        f"{config.coordinator_address} within {config.init_timeout_s} s: "
        f"{describe_error(e)}") from e
  return ProcessGroup(config, jax_distributed.global_state.client)


def exit_code(error: BaseException) -> int:
  """The exit status for a run that ended with ``error``."""
  return EXIT_PEER_FAILED if isinstance(error, PeerFailed) else EXIT_FAILED


def shard_label(index: int, count: int) -> str:
  """``"i/n"``, as ``--shard`` spells it."""
  return f"{int(index)}/{int(count)}"


def parse_shard(text: str) -> tuple[int, int]:
  """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``.

  Raises:
    ValueError: anything else.
  """
  parts = str(text).strip().split("/")
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise ValueError(f"a shard is 'i/n' with 0 <= i < n (e.g. 0/2), got {text!r}")
  i, n = int(parts[0]), int(parts[1])
  if not 0 <= i < n:
    raise ValueError(f"shard {text!r}: need 0 <= i < n")
  return i, n


def format_process_paths(options: dict[str, Any], group: Group,
                         keys: Sequence[str] = ("sealed_path", "key_path", "workdir",
                                                "socket_path")) -> dict[str, Any]:
  """Fills ``{process_id}`` / ``{num_processes}`` in per-process bridge paths.

  With several processes a non-empty ``workdir`` without a placeholder gets a
  ``process-<i>`` subfolder, so no two enclaves share a log or socket folder.
  """
  out = dict(options)
  for k in keys:
    v = out.get(k)
    if isinstance(v, str) and v:
      new = v.replace("{process_id}", str(group.process_id)).replace(
          "{num_processes}", str(group.num_processes))
      if k == "workdir" and group.multi and new == v:
        new = os.path.join(v, f"process-{group.process_id}")
      out[k] = new
  return out

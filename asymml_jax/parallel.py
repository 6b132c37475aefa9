"""Data parallelism over the accelerators of one host (DESIGN section 10).

A :class:`jax.sharding.Mesh` with one axis, ``data`` (:data:`DATA_AXIS`), over
the untrusted devices of this host.  Every backend that takes ``mesh=``
(``dense``, ``inline``, ``local``, ``enclave``) runs its jitted step with the
batch sharded over ``data`` and the weights and batch statistics replicated;
the outputs (loss, gradients, new statistics, metrics) are replicated, so XLA
inserts the cross-device reduction of the gradients itself.  Nothing here is
home-made collective code: the program keeps JAX's global-array semantics and
the SPMD partitioner does the rest.

**Callbacks on one host: one call per stage for the whole batch.**  The
``local`` and ``enclave`` backends run each trusted stage behind a
``jax.pure_callback``.  Inside a ``jax.jit`` with automatically sharded
inputs, a callback has bulk-array semantics: XLA gathers its operands, runs
the host function *once* on the whole logical batch, and returns whole arrays
(placed on the mesh's first device).  This is the design's "one enclave per
host serves the host's whole shard set" taken literally, and it keeps the
trusted computation exactly that of the single-device model: BatchNorm sees
the whole batch, ``per_batch`` subspaces are fitted on the whole batch, and
the per-batch statistics and metrics are the same numbers.  The residuals the
callback returns are then re-sharded over ``data`` with
:func:`shard_batch` (``jax.lax.with_sharding_constraint``) before the
untrusted convolutions, so the accelerator work — the bulk of the FLOPs — is
data-parallel, and the gradient cotangents flow back sharded until the
backward callback gathers them again.  ``inline`` does the same without a
callback: each trusted stage runs inside a ``jax.shard_map`` with replicated
inputs and outputs, i.e. on the whole batch like one enclave, and only the
untrusted convolutions are split.  ``dense`` has no trusted half; every layer
is data-parallel and its BatchNorm statistics are reductions over the mesh
(again the single-device numbers).

**Several hosts need per-shard callbacks.**  With ``jax.distributed`` each
process only holds its own shards and a callback cannot see a global array;
there the trusted stages must be called per shard, each host's enclave
serving its own addressable shards (a callback inside ``jax.shard_map``, or
one step per process on its own shard with the gradients averaged across
processes, :mod:`asymml_jax.distributed`), and statistics that span the batch
(BatchNorm, ``per_batch`` subspaces) then become per-host.  This module only
provides the single-host mesh.

**CPU meshes.**  ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (set
before JAX initialises) gives ``N`` CPU devices for testing.  A host callback
inside a program that spans *every* CPU device can deadlock there: while one
device runs the callback, the others wait for its result inside a collective
and hold XLA's CPU threads, and ``jax.pure_callback`` first copies its
operands onto a CPU device, which then finds no thread (XLA aborts the
process after a minute; jax 0.10.2).  So a callback backend (``local``,
``enclave``, or ``inline`` with integrity checks) on a CPU mesh needs at least
one CPU device left out of the mesh (:func:`check_callback_mesh`), and the
experiment scripts ask for one spare device themselves while JAX has not
started yet (:func:`reserve_spare_cpu_device`).  Accelerator meshes are
unaffected: there the callbacks' copies go to the CPU, which the mesh does not
occupy.
"""

from __future__ import annotations

import os
import re
from typing import Any, MutableMapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
Tree = Any


def _available(platform: str | None) -> list[jax.Device]:
  if platform is None:
    return list(jax.local_devices())
  from asymml_jax import backends  # the clear "no such device" error lives there
  backends.untrusted_device(platform)
  return list(jax.local_devices(backend=platform))


def make_mesh(devices: int | Sequence[jax.Device] | None = None, *,
              platform: str | None = None) -> Mesh:
  """A one-axis (``data``) mesh over this host's devices (DESIGN section 10).

  Args:
    devices: how many of the host's devices to use (the first ``devices`` of
      them), an explicit sequence of devices, or ``None`` for all of them.
    platform: ``"cpu"``, ``"gpu"`` or ``"tpu"`` to take the devices of that
      platform (:func:`asymml_jax.backends.untrusted_device` raises a clear
      error when it is absent); ``None`` for JAX's default platform.

  Returns:
    ``Mesh(devices, ("data",))``.

  Raises:
    ValueError: a count below 1, more devices than the host has (with the
      ``XLA_FLAGS`` hint for CPU), an empty or repeated device list, devices of
      mixed platforms, or an absent platform.
  """
  if devices is None or isinstance(devices, int):
    if isinstance(devices, bool):
      raise ValueError(f"the number of devices must be an integer, got {devices!r}")
    available = _available(platform)
    n = len(available) if devices is None else int(devices)
    if n < 1:
      raise ValueError(f"the number of devices must be >= 1, got {n}")
    if n > len(available):
      kind = available[0].platform if available else (platform or "?")
      hint = ""
      if kind == "cpu":
        hint = ("; for several CPU devices set XLA_FLAGS=--xla_force_host_platform_device_"
                f"count={n} in the environment before JAX starts")
      raise ValueError(f"{n} devices were asked for but this host has {len(available)} "
                       f"{kind} device{'s' if len(available) != 1 else ''}{hint}")
    chosen = available[:n]
  else:
    chosen = list(devices)
    if not chosen:
      raise ValueError("make_mesh needs at least one device")
    if len(set(chosen)) != len(chosen):
      raise ValueError(f"a device appears twice in {chosen}")
    platforms = {d.platform for d in chosen}
    if len(platforms) != 1:
      raise ValueError(f"the mesh's devices must share one platform, got {sorted(platforms)}")
    if platform is not None and platforms != {platform}:
      raise ValueError(f"asked for {platform} devices, got {sorted(platforms)}")
  return Mesh(chosen, (DATA_AXIS,))


def num_devices(mesh: Mesh | None) -> int:
  """Devices in ``mesh`` (1 for ``None``: no mesh is one device)."""
  return 1 if mesh is None else int(mesh.devices.size)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``; the other axes whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of ``mesh`` (weights, statistics, scalars)."""
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh | None, what: str = "batch") -> None:
  """Raises ``ValueError`` unless ``batch_size`` rows split evenly over ``mesh``.

  Every device gets the same number of rows (padding rows instead would change
  BatchNorm's statistics, so it is refused rather than done silently).
  """
  n = num_devices(mesh)
  if batch_size % n:
    raise ValueError(f"a {what} of {batch_size} rows cannot be split evenly over {n} "
                     f"devices: choose a {what} size that is a multiple of {n}")


def check_callback_mesh(mesh: Mesh | None, what: str) -> None:
  """Refuses a CPU mesh on which host callbacks could deadlock (module docstring).

  Args:
    mesh: the mesh (``None``: nothing to check).
    what: who calls the host, for the message (e.g. ``"the enclave backend"``).

  Raises:
    ValueError: ``mesh`` has several CPU devices and leaves none of this host's
      CPU devices out.
  """
  if mesh is None or num_devices(mesh) < 2:
    return
  devices = list(mesh.devices.flat)
  if any(d.platform != "cpu" for d in devices):
    return
  total = len(jax.local_devices(backend="cpu"))
  if len(devices) >= total:
    raise ValueError(
        f"{what} calls the host from inside the step; on a mesh of all "
        f"{total} CPU devices the waiting devices hold XLA's CPU threads and the callback "
        "can deadlock. Leave one CPU device out of the mesh: e.g. "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={total + 1} for a mesh of "
        f"{len(devices)}")


_FORCE_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def reserve_spare_cpu_device(num_devices: int, environ: MutableMapping[str, str] | None = None
                             ) -> str | None:
  """Before JAX starts: one more forced CPU device than a mesh of ``num_devices`` uses.

  When ``XLA_FLAGS`` forces exactly ``num_devices`` (> 1) host CPU devices and
  JAX's backends are not initialised yet, raises the count by one so that a
  callback backend's mesh can leave a device free (module docstring, "CPU
  meshes"); the mesh still has ``num_devices`` devices.  Otherwise changes
  nothing.

  Returns:
    A note saying what was changed, or ``None``.
  """
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  match = _FORCE_FLAG.search(flags)
  if num_devices < 2 or match is None or int(match.group(1)) != num_devices:
    return None
  from jax._src import xla_bridge  # no public equivalent
  if xla_bridge.backends_are_initialized():
    return None
  environ["XLA_FLAGS"] = _FORCE_FLAG.sub(
      f"--xla_force_host_platform_device_count={num_devices + 1}", flags, count=1)
  return (f"forcing {num_devices + 1} host CPU devices for a mesh of {num_devices}: host "
          "callbacks need one CPU device outside the mesh (asymml_jax.parallel)")


def shard_batch(tree: Tree, mesh: Mesh | None) -> Tree:
  """Inside ``jit``: constrains every leaf's leading axis to be split over ``data``.

  A no-op without a mesh.  Used on the residuals a trusted-stage callback
  returns, so the untrusted convolutions that read them run data-parallel.
  """
  if mesh is None:
    return tree
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def replicate(tree: Tree, mesh: Mesh | None) -> Tree:
  """Inside ``jit``: constrains every leaf to be whole on every device of ``mesh``."""
  if mesh is None:
    return tree
  sharding = replicated(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def put_replicated(tree: Tree, mesh: Mesh | None) -> Tree:
  """Outside ``jit``: ``tree`` copied to every device of ``mesh`` (no-op when already so)."""
  return tree if mesh is None else jax.device_put(tree, replicated(mesh))


def put_batch(batch: Tree, mesh: Mesh | None) -> Tree:
  """Outside ``jit``: a batch's leading axis split over ``data`` (checked to divide)."""
  if mesh is None:
    return batch
  leaves = jax.tree_util.tree_leaves(batch)
  if leaves:
    check_batch_size(int(leaves[0].shape[0]), mesh)
  return jax.device_put(batch, batch_sharding(mesh))

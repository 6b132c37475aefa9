"""Enough XLA CPU threads for host callbacks that wait on XLA work.

The callback backends (``local``, and the driver of ``enclave`` and
``tee_only``) run trusted stages inside ``jax.pure_callback``.  A callback
occupies one thread of the XLA CPU client's pool while it waits on XLA
work: the ``local`` executor's programs, or reading a ``jax.Array``
argument before it is sent.  XLA sizes that pool from the CPUs in the
process's affinity, so with one CPU (``taskset -c 0``, a 1-CPU container)
the work it waits for can never run and the step hangs.

XLA reads the pool size from ``PJRT_NPROC`` when the CPU client is
created.  :func:`ensure_callback_threads` raises it to
:data:`MIN_CALLBACK_THREADS` on such machines; importing :mod:`asymml_jax`
calls it.  A client created before that import keeps its size, and
:func:`check_callback_threads` then refuses a callback backend with the fix,
instead of a silent hang.
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping

MIN_CALLBACK_THREADS = 2
ENV = "PJRT_NPROC"
_started_too_small = False  # the CPU client existed, too small, before ensure ran


def _affinity() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def _backends_started() -> bool:
  from jax._src import xla_bridge  # private, but the only way to ask
  return bool(xla_bridge.backends_are_initialized())


def pool_threads(environ: MutableMapping[str, str] | None = None,
                 cpus: int | None = None) -> int:
  """The pool size XLA derives: ``PJRT_NPROC`` if set and valid, else the CPU count."""
  environ = os.environ if environ is None else environ
  cpus = _affinity() if cpus is None else cpus
  try:
    return max(1, int(environ.get(ENV, "")))
  except ValueError:
    return cpus


def ensure_callback_threads(environ: MutableMapping[str, str] | None = None,
                            cpus: int | None = None,
                            started: Callable[[], bool] = _backends_started) -> bool:
  """Sets ``PJRT_NPROC`` so that XLA's pool has at least two threads.

  Leaves an explicit setting of two or more and machines with two or more
  CPUs alone.  Returns whether callbacks can run without deadlock.
  """
  global _started_too_small
  environ = os.environ if environ is None else environ
  if pool_threads(environ, cpus) >= MIN_CALLBACK_THREADS:
    return True
  if started():
    _started_too_small = True
    return False
  environ[ENV] = str(MIN_CALLBACK_THREADS)
  return True


def check_callback_threads(backend: str) -> None:
  """Raises ``RuntimeError`` when ``backend``'s callbacks would deadlock (see module doc)."""
  if _started_too_small or not ensure_callback_threads():
    raise RuntimeError(
        f"the {backend} backend runs trusted stages in host callbacks, and JAX's CPU "
        f"client was created with one thread (one CPU in this process's affinity): "
        f"the first step would hang. Set {ENV}={MIN_CALLBACK_THREADS} in the "
        f"environment, or import asymml_jax before running any JAX computation.")

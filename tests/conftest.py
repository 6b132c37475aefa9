"""Session-wide test settings: one persistent XLA compilation cache per pytest run.

Compile time dominates this suite on a 2-core CPU.  Many tests build the same
tiny models and backends and so compile identical XLA programs in separate
``jax.jit`` objects (and in separate enclave processes), which JAX's
in-memory caches cannot share.  A persistent compilation cache keyed by the
program's fingerprint can: this process and every enclave subprocess it
starts (the launcher passes the environment on) read and write one cache
folder, created fresh for the run and removed at its end, so results never
depend on an earlier run.  Under pytest-xdist (``make test`` runs two workers,
one per core, files kept whole with ``--dist loadfile``) the workers share the
controller's folder.  Set ``ASYMML_TEST_XLA_CACHE=off`` to disable it.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax

_CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
_cache_dir: str | None = None


def pytest_configure(config):
  del config
  global _cache_dir
  if os.environ.get("ASYMML_TEST_XLA_CACHE", "").lower() == "off":
    return
  shared = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if os.environ.get("PYTEST_XDIST_WORKER") and shared:
    cache = shared  # a pytest-xdist worker: the controller's folder (it removes it)
  else:
    cache = _cache_dir = tempfile.mkdtemp(prefix="asymml-test-xla-cache-")
  os.environ.update(_CACHE_ENV, JAX_COMPILATION_CACHE_DIR=cache)
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
  del config
  if _cache_dir is not None:
    shutil.rmtree(_cache_dir, ignore_errors=True)

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

The tests also compile with LLVM's cheapest code generation
(``--xla_backend_optimization_level=0`` appended to ``XLA_FLAGS``, before JAX
starts its backend): XLA's HLO passes, and so the compiled program (fusions,
sharding, convolution and dot calls into Eigen), are the same; only the
machine code of the fused loops is less optimised, which roughly halves the
compile time of this suite's tiny models and costs little at their run time.
Python subprocesses get it too, enclave servers included (their launcher
replaces ``XLA_FLAGS``; ``tests/helpers/xla_site/sitecustomize.py``, put on
``PYTHONPATH`` here, adds the flag back as each starts).  Set
``ASYMML_TEST_XLA_OPT=default`` to compile as in production.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax

_CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
_cache_dir: str | None = None
_OPT_FLAG = "--xla_backend_optimization_level=0"
_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers", "xla_site")

if os.environ.get("ASYMML_TEST_XLA_OPT", "").lower() != "default":
  if _OPT_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_OPT_FLAG}".strip()
  # Python subprocesses (enclave servers too) add it at start-up: helpers/xla_site.
  os.environ["ASYMML_TEST_SUBPROCESS_XLA_FLAGS"] = _OPT_FLAG
  _path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  if _SITE not in _path:
    os.environ["PYTHONPATH"] = os.pathsep.join([*_path, _SITE])


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

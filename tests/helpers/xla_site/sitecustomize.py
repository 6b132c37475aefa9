"""Test scaffolding: Python subprocesses of the test run compile like the test process.

``tests/conftest.py`` puts this folder on ``PYTHONPATH`` and names the XLA
flags in ``ASYMML_TEST_SUBPROCESS_XLA_FLAGS``.  Python imports
``sitecustomize`` at start-up, so every Python subprocess the tests start
(enclave servers included, whose launcher replaces ``XLA_FLAGS`` with its
thread settings) puts those flags in front of its own ``XLA_FLAGS`` before
JAX starts: in front, because XLA ignores every flag after a bare token such
as the launcher's ``intra_op_parallelism_threads=1``.  Without the variable
this does nothing.  The environment the launcher builds, which the launcher
tests check, is unchanged.
"""

import os

_extra = os.environ.get("ASYMML_TEST_SUBPROCESS_XLA_FLAGS", "").split()
_flags = os.environ.get("XLA_FLAGS", "").split()
_names = {f.split("=", 1)[0] for f in _flags}
_missing = [f for f in _extra if f.split("=", 1)[0] not in _names]
if _missing:
  os.environ["XLA_FLAGS"] = " ".join(_missing + _flags)
del _extra, _flags, _names, _missing

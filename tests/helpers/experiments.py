"""Import several absl experiment scripts into one pytest process.

Each script defines its flags at import (``--workdir``, ``--json`` ...); two
scripts with a flag of the same name cannot both be imported into absl's one
global ``FLAGS``.  The tests only call the scripts' functions in-process (the
command lines run in subprocesses), so a clashing earlier definition is
dropped and the import retried.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from absl import flags


def import_experiment(name: str) -> ModuleType:
  """``importlib.import_module(name)``, dropping flags an earlier script defined."""
  for _ in range(200):
    try:
      return importlib.import_module(name)
    except flags.DuplicateFlagError as e:
      sys.modules.pop(name, None)
      # The failed attempt's own definitions stay registered: drop them too,
      # or the retry clashes with itself.
      own = [f.name for f in flags.FLAGS.flags_by_module_dict().get(name, [])]
      for flag in {str(e).split("'")[1], *own}:
        if flag in flags.FLAGS:
          delattr(flags.FLAGS, flag)
  raise RuntimeError(f"could not import {name}: too many clashing flags")

r"""Prints the per-site split plan and trusted-MAC cost of a model (DESIGN section 5).

Usage:

  python -m experiments.plan --model=vgg16 --input_size=224 [--channels=3] \
      [--batch_size=1] [--rank_fraction=0.0625] [--max_rank=N] [--num_iters=2] \
      [--scope=per_sample|per_batch] [--json=FILE]

A thin entry point: the model comes from ``asymml_jax.models.get_model`` and
the plan from ``asymml_jax.plan.make_plan``; this script only parses flags,
prints ``Plan.table()`` and optionally writes ``Plan.to_dict()`` as JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Sequence

from absl import app
from absl import flags

from asymml_jax import models
from asymml_jax import plan as plan_lib
from asymml_jax.decomposition import SCOPES, DecompositionConfig
from asymml_jax.models.base import MIN_INPUT_SIZE

_MODEL = flags.DEFINE_string(
    "model", "vgg16", f"Model name, one of: {', '.join(sorted(models.MODELS))}.")
_INPUT_SIZE = flags.DEFINE_integer(
    "input_size", 224, "Input height and width (square images).",
    lower_bound=MIN_INPUT_SIZE)
_CHANNELS = flags.DEFINE_integer("channels", 3, "Input channels.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1, "Samples per batch.",
                                   lower_bound=1)
_RANK_FRACTION = flags.DEFINE_float(
    "rank_fraction", 1.0 / 16.0, "r_max = ceil(rank_fraction * C), in (0, 1].")
_MAX_RANK = flags.DEFINE_integer("max_rank", None, "Optional cap on r_max.",
                                 lower_bound=1)
_NUM_ITERS = flags.DEFINE_integer("num_iters", 2, "Subspace iterations.",
                                  lower_bound=1, upper_bound=10)
_SCOPE = flags.DEFINE_enum(
    "scope", "per_sample", list(SCOPES),
    "Subspace scope allowed: per_sample, or per_batch (also allows per-batch sites).")
_JSON = flags.DEFINE_string("json", None, "Optional path for the plan as JSON.")

flags.register_validator(
    "model", lambda name: name in models.MODELS,
    message=f"unknown model; choices: {', '.join(sorted(models.MODELS))}")
flags.register_validator(
    "rank_fraction", lambda v: 0.0 < v <= 1.0, message="must be in (0, 1]")


def write_json_atomically(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` via a temporary file and ``os.replace``."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".plan-", suffix=".json.tmp")
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; use the usual mode.
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  size = _INPUT_SIZE.value
  try:
    model = models.get_model(_MODEL.value, input_shape=(size, size, _CHANNELS.value))
    decomposition = DecompositionConfig(
        rank_fraction=_RANK_FRACTION.value, max_rank=_MAX_RANK.value, tau=0.0,
        num_iters=_NUM_ITERS.value, scope=_SCOPE.value)
    plan = plan_lib.make_plan(model, _BATCH_SIZE.value, decomposition)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(plan.table())
  if _JSON.value:
    write_json_atomically(_JSON.value, plan.to_dict())
    print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main)

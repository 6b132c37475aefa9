"""Trains a model through any backend and writes WORKDIR/summary.json.

  python -m experiments.train --config=experiments/configs/mnist.py --workdir=/tmp/run \
      --config.backend=inline

Rerunning with the same workdir resumes from the latest checkpoint.

Several hosts (DESIGN section 10): start one process per host with the same
config and workdir (shared, or at least reachable by process 0) and
``--coordinator_address=HOST0:PORT --num_processes=N --process_id=I``; each
starts its own enclave over its own sealed shard (``{process_id}`` in the
bridge paths is filled in), gradients are averaged across processes and the
privacy accounting uses the global batch.  ``python -m experiments.multihost``
starts N such processes on this machine.  If any process fails, every process
stops with an error naming it (exit status 1 for the failed process, 75 for
the others); rerun all of them to resume from the shared checkpoint.
"""

import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

import enclave_bridge  # noqa: F401 - registers the enclave and tee_only backends
from asymml_jax import distributed, faults, parallel, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, summary.json).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "HOST:PORT of process 0's coordination service (jax.distributed); needed when "
    "--num_processes > 1.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes (hosts) in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process, in [0, num_processes).")
_ABORT_TIMEOUT = flags.DEFINE_float(
    "abort_timeout", 20.0, "Seconds within which every process stops after one fails.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 20, "Seconds of silence after which a process counts as dead.")
flags.mark_flags_as_required(["config", "workdir"])


def multihost_config() -> distributed.MultihostConfig | None:
  """The multi-host settings from the flags, or None for a single-process run."""
  if _NUM_PROCESSES.value == 1 and not _COORDINATOR.value:
    return None
  if not _COORDINATOR.value:
    raise app.UsageError("--num_processes > 1 needs --coordinator_address=HOST:PORT "
                         "(where process 0 serves the coordination service)")
  try:
    return distributed.MultihostConfig(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value, abort_timeout_s=_ABORT_TIMEOUT.value,
        heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
  if _CONFIG.value.get("backend") in ("local", "enclave"):
    # Host callbacks on a CPU mesh need a CPU device outside it (asymml_jax.parallel).
    note = parallel.reserve_spare_cpu_device(int(_CONFIG.value.get("num_devices", 1)))
    if note:
      print(note, flush=True)
  settings = multihost_config()
  if settings is None:
    try:
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except Exception as e:  # noqa: BLE001 - a fault's first line says what to do
      line = faults.first_line(e)
      if line is None and isinstance(e, (ValueError, FileNotFoundError)):
        raise app.UsageError(str(e)) from None  # a settings error
      print(f"error: {line or e}", file=sys.stderr, flush=True)
      traceback.print_exc()
      sys.exit(1)
    return
  group = distributed.initialize(settings)
  me = f"process {settings.process_id} of {settings.num_processes}"
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, group=group)
  except distributed.PeerFailed as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(distributed.EXIT_PEER_FAILED)
  except Exception as e:  # noqa: BLE001 - reported with the process it happened in
    if not isinstance(e, (ValueError, FileNotFoundError)):  # not a settings error
      traceback.print_exc()
    print(f"error: {me} failed after {group.position}: {distributed.describe_error(e)}",
          file=sys.stderr, flush=True)
    sys.exit(distributed.EXIT_FAILED)
  except KeyboardInterrupt:
    print(f"error: {me} interrupted", file=sys.stderr, flush=True)
    sys.exit(130)
  finally:
    group.close()


if __name__ == "__main__":
  app.run(main)

"""Checkpoints of a training run: atomic orbax saves, resume, and a full disk (DESIGN section 4).

Orbax writes each checkpoint into a temporary directory, in the background,
and renames it into place once complete; a write that fails (a full disk, a
quota) leaves the earlier checkpoints as they were.  :class:`Checkpoints`
turns such a failure into :class:`asymml_jax.faults.CheckpointWriteFailed`,
whose first line says which checkpoint is intact and how to resume from it.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from asymml_jax import distributed as dist
from asymml_jax import faults

_OS_ERROR = re.compile(r"os_error_code='?(\d+)")


def _reason(error: BaseException) -> str:
  """``error``'s cause in a few words: the OS error if one is in its chain."""
  e: BaseException | None = error
  while e is not None:
    if isinstance(e, OSError) and e.errno:
      return f"{os.strerror(e.errno)} (errno {e.errno})"
    m = _OS_ERROR.search(str(e))
    if m:
      return f"{os.strerror(int(m.group(1)))} (errno {m.group(1)})"
    e = e.__cause__ or e.__context__
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


class Checkpoints:
  """Orbax checkpoints in ``directory``; with several processes, process 0's alone.

  Process 0 saves host (numpy) copies of the state, identical on every
  process, and on a restart restores and broadcasts it (DESIGN section 10).
  The two newest checkpoints are kept.
  """

  def __init__(self, directory: str, group: dist.Group):
    self.directory, self.group, self._mngr = directory, group, None
    self._writing: int | None = None  # the step of the last save (maybe still in flight)
    if not group.multi:
      self._mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
          max_to_keep=2, create=True))
    elif group.is_primary:
      os.makedirs(directory, exist_ok=True)  # orbax refuses create=True here
      self._mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
          max_to_keep=2, create=False, multiprocessing_options=ocp.options.MultiprocessingOptions(
              primary_host=group.process_id, active_processes={group.process_id})))

  def latest_step(self) -> int | None:
    """This process's view (``None`` on the processes that hold no checkpoints)."""
    return None if self._mngr is None else self._mngr.latest_step()

  def resume_step(self) -> int | None:
    """Process 0's latest step, on every process."""
    step = self.latest_step()
    if self.group.multi:
      step = int(self.group.broadcast(np.int32(-1 if step is None else step),
                                      label="resume step"))
      step = None if step < 0 else step
    return step

  def restore(self, step: int, state: Any) -> Any:
    if not self.group.multi:
      return self._mngr.restore(step, args=ocp.args.StandardRestore(state))
    host = jax.device_get(state)
    if self._mngr is not None:
      host = self._mngr.restore(step, args=ocp.args.StandardRestore(host))
    return self.group.broadcast(host, label="restored state")

  def _failed(self, error: Exception) -> faults.CheckpointWriteFailed:
    return faults.CheckpointWriteFailed(
        f"writing the checkpoint of step {self._writing} under {self.directory} failed: "
        f"{_reason(error)}")

  def save(self, step: int, state: Any) -> None:
    """Starts writing ``state`` as step ``step`` (raises a failed earlier write)."""
    if self._mngr is None:
      return
    state = jax.device_get(state) if self.group.multi else state
    try:
      self._mngr.wait_until_finished()  # a failed earlier write is reported as itself
    except Exception as e:  # noqa: BLE001 - orbax raises what its writer met
      raise self._failed(e) from e
    self._writing = step
    try:
      self._mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    except Exception as e:  # noqa: BLE001
      raise self._failed(e) from e

  def wait_until_finished(self, *, quiet: bool = False) -> None:
    """Blocks until the write in flight is complete.

    Args:
      quiet: swallow a failed write (when another error is already on its way).

    Raises:
      CheckpointWriteFailed: unless ``quiet``.
    """
    if self._mngr is None:
      return
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      if not quiet:
        raise self._failed(e) from e

  def close(self) -> None:
    if self._mngr is not None:
      try:
        self._mngr.close()
      except Exception:  # noqa: BLE001 - a failed write was already raised or is moot
        pass

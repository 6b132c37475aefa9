"""How a failed run tells its user what happened and what to do (DESIGN section 6).

A fault's first line names it, the step it hit and the way back (a rerun of
the same command resumes from the last checkpoint); the traceback follows it.
"""

from __future__ import annotations


class TrustedSideFault(RuntimeError):
  """The trusted side died, hung or stopped answering; the run's checkpoints are intact.

  Process backends raise subclasses (``enclave_bridge.client.EnclaveDied``,
  ``EnclaveTimeout``, ``EnclaveHung``).
  """


class CheckpointWriteFailed(RuntimeError):
  """A checkpoint could not be written (a full disk, a quota); the earlier ones are intact.

  Raised by ``asymml_jax.checkpoints.Checkpoints``.
  """


def headline(error: BaseException, step: int | None, resume_step: int | None) -> str:
  """The first line for ``error`` raised at ``step`` (``None``: after the last step).

  Args:
    error: what was raised.
    step: the step that was running, or ``None`` for the final evaluation.
    resume_step: the last checkpoint's step (``None``: none written yet).

  Returns:
    e.g. ``"the enclave process died (SIGKILL) at step 125; rerun the same
    command to resume from step 100"``.
  """
  lines = str(error).strip().splitlines()
  what = lines[0].rstrip(".;: ") if lines else type(error).__name__
  where = f"at step {step}" if step is not None else "in the final evaluation"
  origin = "step 0" if not resume_step else f"step {resume_step}"
  if isinstance(error, TrustedSideFault):
    todo = f"rerun the same command to resume from {origin}"
  elif isinstance(error, CheckpointWriteFailed):
    intact = f"the checkpoint at step {resume_step} is intact" if resume_step else (
        "no checkpoint was written before")
    todo = f"{intact}: free disk space, then rerun the same command to resume from {origin}"
  else:
    todo = (f"the last checkpoint is at step {resume_step}" if resume_step
            else "no checkpoint was written yet")
  return f"{what} {where}; {todo}"


_ATTR = "_asymml_headline"


def annotate(error: BaseException, step: int | None, resume_step: int | None) -> None:
  """Attaches :func:`headline` to ``error`` (also as a note after its message)."""
  if getattr(error, _ATTR, None) is None:
    line = headline(error, step, resume_step)
    setattr(error, _ATTR, line)
    error.add_note(line)


def first_line(error: BaseException) -> str | None:
  """The headline :func:`annotate` attached to ``error``, if any."""
  return getattr(error, _ATTR, None)

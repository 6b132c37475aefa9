"""Tests of asymml_jax.faults: the first line of a failed run says what to do."""

from __future__ import annotations

from asymml_jax import faults


class Died(faults.TrustedSideFault):
  pass


def test_a_trusted_side_fault_says_how_to_resume():
  line = faults.headline(Died("the enclave process died (SIGKILL)\ndetails"), 125, 100)
  assert line == ("the enclave process died (SIGKILL) at step 125; rerun the same command "
                  "to resume from step 100")
  assert faults.headline(Died("gone."), 3, None).endswith("resume from step 0")


def test_other_errors_name_the_last_checkpoint():
  assert faults.headline(OSError("No space left on device"), 7, 5) == (
      "No space left on device at step 7; the last checkpoint is at step 5")
  assert faults.headline(RuntimeError(""), None, None) == (
      "RuntimeError in the final evaluation; no checkpoint was written yet")


def test_annotate_attaches_the_line_once_and_as_a_note():
  e = Died("the enclave hangs: no progress")
  faults.annotate(e, 4, 2)
  faults.annotate(e, 9, 8)  # the innermost annotation wins
  assert faults.first_line(e) == ("the enclave hangs: no progress at step 4; rerun the "
                                  "same command to resume from step 2")
  assert e.__notes__ == [faults.first_line(e)]
  assert faults.first_line(ValueError("x")) is None

"""The fault table: what a user sees when a part of the system fails (DESIGN section 6).

Each row names a fault, the error the user sees (its first line says what to
do), an upper bound on the time from the fault to that error, what is lost,
and the tests that cause the fault and assert all of it.  Those tests carry
``@pytest.mark.fault("<key>")`` and take their time bounds from here
(:func:`bound`), so the table cannot promise more than the suite checks.  The
README's fault table is generated from this module
(``python -m enclave_bridge.fault_table``).
"""

from __future__ import annotations

import dataclasses
import sys

CLIENT = "tests/enclave_bridge/test_client.py"
SERVER = "tests/enclave_bridge/test_server.py"
TRANSPORT = "tests/enclave_bridge/test_transport.py"
LAUNCHER = "tests/enclave_bridge/test_launcher.py"
SEAL = "tests/enclave_bridge/test_seal.py"
INTEGRATION = "tests/enclave_bridge/test_integration.py"
INTEGRITY = "tests/asymml_jax/test_integrity.py"
CHECKPOINTS = "tests/asymml_jax/test_checkpoints.py"

RESUMES = ("nothing: the checkpoints are intact, and rerunning the same command resumes "
           "from the last one to the losses of an uninterrupted run")
REFUSED = "nothing: the call is refused before any state changes; the enclave serves on"


@dataclasses.dataclass(frozen=True)
class Fault:
  """One row of the fault table.

  Attributes:
    key: the name tests give ``@pytest.mark.fault``.
    fault: what goes wrong.
    sees: the error the user sees, and its message.
    within_s: the bound, in seconds, on the time from the fault to the error
      (``None``: the error comes from the very call that meets the fault).
    lost: what is lost.
    tests: ``path::function`` of every test that backs the row.
  """

  key: str
  fault: str
  sees: str
  within_s: float | None
  lost: str
  tests: tuple[str, ...]

  def __post_init__(self):
    if not self.tests:
      raise ValueError(f"fault {self.key!r} names no test")
    if self.within_s is not None and not self.within_s > 0:
      raise ValueError(f"fault {self.key!r}: within_s must be > 0, got {self.within_s}")

  @property
  def time_to_error(self) -> str:
    return "in the same call" if self.within_s is None else f"under {self.within_s:g} s"


def _kill(when: str, where: str) -> Fault:
  return Fault(f"enclave_sigkill_{when}", f"the enclave process is killed (SIGKILL) {where}",
               "`EnclaveDied`: `the enclave process died (SIGKILL) ... at step N; rerun the "
               "same command to resume from step M`",
               10.0, RESUMES,
               (f"{CLIENT}::test_kill_9_mid_step_is_enclave_died_fast",
                f"{INTEGRATION}::test_crash_then_resume_matches_an_uninterrupted_run"))


FAULTS: dict[str, Fault] = {f.key: f for f in [
    _kill("forward", "mid-forward, the driver waiting for its reply"),
    _kill("backward", "mid-backward, the driver waiting for its reply"),
    _kill("between_calls", "between calls: the next request meets a closed connection"),
    Fault("enclave_sigstop", "the enclave process is stopped (SIGSTOP): a hang",
          "`EnclaveHung` (an `EnclaveTimeout`) naming the call waited on and the enclave's "
          "state (`T (stopped)`), after `bridge.watchdog_s` without CPU or progress on "
          "either side; bound for `watchdog_s=2`", 5.0, RESUMES,
          (f"{CLIENT}::test_stopped_enclave_is_enclave_hung_within_the_watchdog_time",)),
    Fault("driver_sigkill", "the driver process is killed (SIGKILL, also SIGTERM or SIGINT)",
          "the enclave exits by itself (`PR_SET_PDEATHSIG`); no orphan process is left",
          2.0, RESUMES, (f"{LAUNCHER}::test_no_orphan_enclave_when_the_driver_dies",)),
    Fault("shm_truncated", "the shared-memory arena is truncated by the untrusted side",
          "`OutOfBounds`: `the shared-memory arena ... is N bytes, smaller than its M-byte "
          "regions (truncated ...)`, from whichever side touches it next; a truncation "
          "that races a copy is a SIGBUS of the copying process (`EnclaveDied`, or the "
          "enclave exits as after a driver kill)", None, RESUMES,
          (f"{TRANSPORT}::test_a_truncated_arena_is_refused_on_both_sides",
           f"{SERVER}::test_arena_truncated_under_the_enclave",
           f"{CLIENT}::test_truncated_or_unlinked_arena")),
    Fault("shm_unlinked", "the shared-memory arena's name is unlinked by the untrusted side",
          "nothing: both processes keep their mappings and the run goes on", None,
          "nothing", (f"{TRANSPORT}::test_an_unlinked_arena_still_carries_tensors",
                      f"{CLIENT}::test_truncated_or_unlinked_arena")),
    Fault("garbage_frames", "garbage frames reach the enclave (random bytes, fields, "
          "descriptors; before or after HELLO)",
          "a typed `ProtocolError` reply (`malformed`, `state`, `out_of_bounds`, ...); a "
          "peer that has not proved the launch secret is dropped", None, REFUSED,
          (f"{SERVER}::test_fuzz_before_hello", f"{SERVER}::test_fuzz_after_hello",
           f"{SERVER}::test_only_the_driver_with_the_launch_secret_gets_in")),
    Fault("replayed_frames", "a frame is replayed or reordered",
          "`OutOfOrder` (`out_of_order`): every frame carries the next sequence number",
          None, REFUSED, (f"{SERVER}::test_replayed_and_reordered_frames",)),
    Fault("oversize_frames", "a frame longer than the protocol's limit is sent or announced",
          "`OversizedFrame` (`oversized`): the sender refuses it; a receiver answers it and "
          "drops the connection without reading the body", None, REFUSED,
          (f"{TRANSPORT}::test_send_refuses_an_oversized_frame",
           f"{TRANSPORT}::test_announced_length_over_the_limit",
           f"{SERVER}::test_an_announced_oversized_frame_is_answered_then_dropped")),
    Fault("nan_from_accelerator", "the accelerator returns NaN or Inf (a conv output, a "
          "weight, a gradient)", "`NonFinite` (`non_finite`) naming the tensor", None,
          REFUSED, (f"{SERVER}::test_non_finite_from_the_accelerator",
                    f"{CLIENT}::test_bad_forward_is_refused_and_the_enclave_stays_usable",
                    f"{CLIENT}::test_bad_backward_is_refused")),
    Fault("tampered_result", "the accelerator returns a wrong convolution "
          "(`decomposition.verify_untrusted=True`)",
          "`IntegrityViolation` (`integrity`) naming the layer and the stage (Freivalds "
          "check)", None, RESUMES,
          (f"{INTEGRITY}::test_verified_train_step_equals_unverified_and_rejects_a_tampering"
           "_accelerator",
           f"{INTEGRITY}::test_enclave_turns_an_integrity_error_into_a_typed_protocol_error")),
    Fault("disk_full", "the disk fills while a checkpoint is written",
          "`CheckpointWriteFailed`: `writing the checkpoint of step N under DIR failed: No "
          "space left on device (errno 28) at step N; the checkpoint at step M is intact: "
          "free disk space, then rerun the same command to resume from step M`", None,
          "nothing: the previous checkpoint survives, and resume uses it",
          (f"{CHECKPOINTS}::test_a_full_disk_keeps_the_previous_checkpoint",)),
    Fault("wrong_key", "the sealed data set is opened with a wrong key",
          "`SealError` / `LauncherError`: `cannot open the sealed data set: ...`, before "
          "any step; nothing is decrypted", None, "nothing",
          (f"{SEAL}::test_wrong_key_is_refused",
           f"{LAUNCHER}::test_real_server_with_wrong_key_fails_with_its_message")),
    Fault("tampered_sealed_file", "a byte of the sealed file is flipped",
          "`SealError` naming the region (authentication failed), before any step; "
          "nothing is decrypted", None, "nothing",
          (f"{SEAL}::test_any_flipped_byte_is_refused",
           f"{SEAL}::test_flipped_header_length_is_refused")),
]}


def bound(key: str) -> float:
  """The time bound (s) row ``key`` promises; tests assert it."""
  if key not in FAULTS:
    raise KeyError(f"unknown fault {key!r}; the table has {', '.join(FAULTS)}")
  within = FAULTS[key].within_s
  if within is None:
    raise ValueError(f"fault {key!r} has no time bound: its error comes in the same call")
  return within


def markdown_table() -> str:
  """The README's fault table."""
  lines = ["| fault | what the user sees | time to the error | what is lost | tests |",
           "| --- | --- | --- | --- | --- |"]
  for f in FAULTS.values():
    tests = "<br>".join(f"`{t.split('/')[-1]}`" for t in f.tests)
    lines.append(f"| {f.fault} | {f.sees} | {f.time_to_error} | {f.lost} | {tests} |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.stdout.write(markdown_table() + "\n")

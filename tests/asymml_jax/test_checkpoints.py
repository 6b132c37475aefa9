"""Checkpoints: save, restore, resume, and a disk that fills during a write."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from asymml_jax import checkpoints, faults
from asymml_jax import distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[2]
FULL_DISK_LIMIT = 4096  # bytes per file: every array file of STATE is larger


def _state(value: float) -> dict:
  """64 KB of incompressible weights (orbax compresses what it writes)."""
  w = np.random.default_rng(int(value)).standard_normal((128, 128)).astype(np.float32)
  return {"w": w, "step": np.array(value, np.int32)}


def _equal(a: dict, b: dict) -> bool:
  return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


# Run in a child process: RLIMIT_FSIZE makes the kernel refuse every write that
# grows a file past FULL_DISK_LIMIT bytes, as a full disk refuses any write.
FULL_DISK = r"""
import json, resource, signal, sys
import numpy as np
from asymml_jax import checkpoints, faults
from asymml_jax import distributed as dist
from tests.asymml_jax.test_checkpoints import _state as state
directory, limit = sys.argv[1], int(sys.argv[2])
mngr = checkpoints.Checkpoints(directory, dist.LOCAL)
mngr.save(2, state(2.0))
mngr.wait_until_finished()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG), as with ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
try:
  mngr.save(4, state(4.0))
  mngr.wait_until_finished()
except faults.CheckpointWriteFailed as e:
  faults.annotate(e, 4, mngr.latest_step())
  print(json.dumps({"error": str(e), "first_line": faults.first_line(e),
                    "latest": mngr.latest_step()}))
  mngr.close()
  sys.exit(0)
print(json.dumps({"error": None}))
"""


def test_save_restore_and_resume_step(tmp_path):
  mngr = checkpoints.Checkpoints(str(tmp_path / "c"), dist.LOCAL)
  assert mngr.latest_step() is None and mngr.resume_step() is None
  for step in (1, 2, 3):
    mngr.save(step, _state(float(step)))
  mngr.wait_until_finished()
  assert mngr.resume_step() == 3
  assert _equal(mngr.restore(3, _state(0.0)), _state(3.0))
  assert sorted(os.listdir(tmp_path / "c")) == ["2", "3"]  # the two newest are kept
  mngr.close()


@pytest.mark.fault("disk_full")
def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
  """The disk fills while step 4's checkpoint is written: ``CheckpointWriteFailed``
  whose first line names the intact checkpoint (step 2), and resume uses it."""
  directory = tmp_path / "c"
  out = subprocess.run([sys.executable, "-c", FULL_DISK, str(directory), str(FULL_DISK_LIMIT)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"\n{report}")
  assert report["error"] is not None, "the write under the file-size limit succeeded"
  assert "writing the checkpoint of step 4" in report["error"]
  assert "File too large (errno 27)" in report["error"]
  assert report["latest"] == 2
  assert report["first_line"].endswith(
      "at step 4; the checkpoint at step 2 is intact: free disk space, then rerun the same "
      "command to resume from step 2")
  # A rerun: resumes from step 2, restores what was saved, and writes on past the debris.
  mngr = checkpoints.Checkpoints(str(directory), dist.LOCAL)
  assert mngr.resume_step() == 2
  assert _equal(mngr.restore(2, _state(0.0)), _state(2.0))
  mngr.save(4, _state(4.0))
  mngr.wait_until_finished()
  assert mngr.latest_step() == 4 and _equal(mngr.restore(4, _state(0.0)), _state(4.0))
  mngr.close()


def test_reason_names_the_os_error_in_the_chain():
  try:
    try:
      raise OSError(28, "No space left on device")
    except OSError as inner:
      raise ValueError("orbax: commit failed") from inner
  except ValueError as e:
    assert checkpoints._reason(e) == "No space left on device (errno 28)"
  assert checkpoints._reason(ValueError("OUT_OF_RANGE: [os_error_code='27']")) == (
      "File too large (errno 27)")
  assert checkpoints._reason(ValueError("no code\nmore")) == "no code"


def test_headline_of_a_failed_write_without_an_earlier_checkpoint():
  line = faults.headline(faults.CheckpointWriteFailed("writing ... failed: x"), 2, None)
  assert line == ("writing ... failed: x at step 2; no checkpoint was written before: free "
                  "disk space, then rerun the same command to resume from step 0")

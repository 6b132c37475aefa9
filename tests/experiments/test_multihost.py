"""Several hosts on this machine: the launcher, shards, failure stop and resume (DESIGN section 10).

The end-to-end test runs ``python -m experiments.multihost`` as a user does:
two processes joined by ``jax.distributed``, each with its own enclave over
its own sealed half of MNIST-5k.  It kills one host's enclave mid-run and
checks that every process stops within 30 s with an error naming the failed
process and the cause, then restarts the job and checks that it resumes from
the shared checkpoint, finishes with identical parameters on both hosts and
the global sampling rate in the summary, and leaves no enclave behind.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import enclave_bridge  # noqa: F401 - registers the enclave backend
from asymml_jax import data as data_lib
from asymml_jax import distributed as dist
from asymml_jax import train
from enclave_bridge import seal
from tests.helpers.experiments import import_experiment

ROOT = pathlib.Path(__file__).resolve().parents[2]
multihost = import_experiment("experiments.multihost")


# ----------------------------------------------------------------- the parts
def test_commands_give_each_process_its_id_and_the_shared_workdir():
  cmds = multihost.commands(2, 4321, "/w", ["--", "--config.max_steps=3"],
                            {"sealed_path": "/w/data/x-{process_id}-of-2.sealed"})
  assert len(cmds) == 2
  for i, cmd in enumerate(cmds):
    assert cmd[1:4] == ["-u", "-m", "experiments.train"]
    assert cmd[4] == f"--config={multihost.DEFAULT_CONFIG}"  # default config first
    assert "--config.max_steps=3" in cmd and "--" not in cmd
    assert cmd.index("--config.bridge.sealed_path=/w/data/x-{process_id}-of-2.sealed") > 4
    assert cmd[-4:] == ["--workdir=/w/train", "--coordinator_address=127.0.0.1:4321",
                        "--num_processes=2", f"--process_id={i}"]
  own = multihost.commands(1, 1, "/w", ["--config=c.py"], {})
  assert own[0][4] == "--config=c.py" and multihost.DEFAULT_CONFIG not in " ".join(own[0])


def test_seal_shards_gives_each_host_its_own_shard_and_key(tmp_path):
  sealed, key = multihost.seal_shards("mnist5k", None, 2, str(tmp_path))
  ds = data_lib.load_dataset("mnist5k")
  keys = set()
  for i in range(2):
    s_i, k_i = sealed.format(process_id=i), key.format(process_id=i)
    header = seal.read_header(s_i)
    assert header["shard"] == {"count": 2, "index": i}
    info = enclave_bridge.sealed_data_info({"sealed_path": s_i})
    assert info["shard"] == (i, 2) and info["num_train"] == 2250
    opened = seal.unseal_dataset(s_i, k_i)
    want = data_lib.shard_dataset(ds, i, 2)
    assert (opened.train_labels == want.train_labels).all()
    keys.add(pathlib.Path(k_i).read_bytes())
    with pytest.raises(seal.WrongKeyOrTampered):
      seal.unseal_dataset(s_i, key.format(process_id=1 - i))  # its own key only
  assert len(keys) == 2
  mtime = os.path.getmtime(sealed.format(process_id=0))
  multihost.seal_shards("mnist5k", None, 2, str(tmp_path))  # reused, not resealed
  assert os.path.getmtime(sealed.format(process_id=0)) == mtime


def test_seal_cli_shard_flag(tmp_path):
  out, key = tmp_path / "s.sealed", tmp_path / "k.bin"
  p = subprocess.run([sys.executable, "-m", "enclave_bridge.seal", "--dataset=mnist5k",
                      f"--out={out}", f"--key={key}", "--new_key", "--shard=1/3"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  header = json.loads(p.stdout)
  assert header["shard"] == {"count": 3, "index": 1}
  assert header["arrays"][1]["shape"] == [1500]
  p = subprocess.run([sys.executable, "-m", "enclave_bridge.seal", "--dataset=mnist5k",
                      f"--out={out}", f"--key={key}", "--shard=3/3"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode != 0 and "--shard" in p.stderr and "Traceback" not in p.stderr


def _py(code: str) -> list[str]:
  return [sys.executable, "-c", code]


def test_job_reports_the_failed_process_not_the_ones_it_stopped(tmp_path):
  import io
  out = io.StringIO()
  job = multihost.Job([_py("import sys, time; time.sleep(0.5); print('bye'); sys.exit(75)"),
                       _py("import sys; print('boom'); sys.exit(3)")],
                      str(tmp_path / "logs"), grace=20.0, out=out)
  job.start()
  assert job.wait() == 3
  text = out.getvalue()
  assert "[p1] boom" in text and "[p0] bye" in text
  assert "process 1 failed (status 3); all stopped (process 0: status 75" in text
  assert (tmp_path / "logs" / "process-1.log").read_text() == "boom\n"


def test_job_kills_a_process_that_does_not_stop_after_a_failure(tmp_path):
  import io
  out = io.StringIO()
  t0 = time.monotonic()
  job = multihost.Job([_py("import time; time.sleep(60)"), _py("import sys; sys.exit(1)")],
                      str(tmp_path / "logs"), grace=1.0, out=out)
  job.start()
  sleeper = job.procs[0].pid
  assert job.wait() == 1
  assert time.monotonic() - t0 < 15.0
  assert "killed process(es) [0]" in out.getvalue()
  assert job.procs[0].returncode == -signal.SIGKILL
  assert not os.path.exists(f"/proc/{sleeper}") or _ppid(sleeper) != os.getpid()


def test_job_success(tmp_path):
  import io
  out = io.StringIO()
  job = multihost.Job([_py("print(1)"), _py("print(2)")], str(tmp_path / "logs"),
                      grace=5.0, out=out)
  job.start()
  assert job.wait() == 0 and "all 2 processes finished (status 0, 0)" in out.getvalue()


class _FakePeer(dist.LocalGroup):
  """Process 1 of 2 without jax.distributed: enough to reach the shard check."""
  process_id, num_processes = 1, 2


def test_a_process_given_the_wrong_shard_is_refused(tmp_path):
  sealed, key = multihost.seal_shards("mnist5k", None, 2, str(tmp_path))
  cfg = {"model": "vgg11", "width": 0.125, "backend": "enclave", "batch_size": 32,
         "bridge": {"sealed_path": sealed.format(process_id=0),  # shard 0 for process 1
                    "key_path": key.format(process_id=0)}}
  with pytest.raises(ValueError, match="process 1 of 2 was given shard 0/2 .* needs shard 1/2"):
    train.train_and_evaluate(cfg, str(tmp_path / "w"), group=_FakePeer())
  assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------- end to end
def _ppid(pid: int) -> int | None:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return int(f.read().rsplit(")", 1)[1].split()[1])
  except (OSError, ValueError, IndexError):
    return None


def _cmdline(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return f.read().replace(b"\0", b" ").decode(errors="replace")
  except OSError:
    return ""


def _enclaves(marker: str, parent: int | None = None) -> list[int]:
  """Live enclave servers whose command line mentions ``marker`` (optionally of ``parent``)."""
  out = []
  for d in os.listdir("/proc"):
    if d.isdigit():
      cmd = _cmdline(int(d))
      if "enclave_bridge.server" in cmd and marker in cmd and (
          parent is None or _ppid(int(d)) == parent):
        with open(f"/proc/{d}/stat") as f:
          if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            out.append(int(d))
  return out


class _Launch:
  """``python -m experiments.multihost`` in the background, its lines timestamped."""

  def __init__(self, args: list[str]):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    self.lines: list[tuple[float, str]] = []
    self.proc = subprocess.Popen([sys.executable, "-m", "experiments.multihost", *args],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append((time.monotonic(), line.rstrip("\n")))

  def wait_for(self, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      for _, line in list(self.lines):
        m = re.search(pattern, line)
        if m:
          return m
      if self.proc.poll() is not None:
        break
      time.sleep(0.05)
    raise AssertionError(f"no line matching {pattern!r}; last lines:\n" + self.text()[-4000:])

  def finish(self, timeout: float) -> int:
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(self.proc.pid, signal.SIGINT)
      self.proc.wait(timeout=60)
      raise AssertionError("the launcher did not finish; last lines:\n" + self.text()[-4000:])
    self._reader.join(timeout=10)
    return self.proc.returncode

  def text(self) -> str:
    return "\n".join(l for _, l in self.lines)


@pytest.mark.slow
def test_two_hosts_stop_together_when_one_enclave_dies_and_resume(tmp_path):
  steps = 10
  args = ["--num_processes=2", f"--workdir={tmp_path}", "--grace=45",
          "--config.width=0.125", "--config.batch_size=32", f"--config.max_steps={steps}",
          "--config.log_every=1", "--config.checkpoint_every=2", "--abort_timeout=15"]
  marker = str(tmp_path)

  # Run 1: kill host 1's enclave once step 4 is done.
  run = _Launch(args)
  try:
    pid1 = int(run.wait_for(r"^\[multihost\] process 1: pid (\d+)", 120).group(1))
    run.wait_for(r"^\[p1\] step 4/", 300)
    victims = _enclaves(marker, parent=pid1)
    assert len(victims) == 1, victims
    assert len(_enclaves(marker)) == 2  # one enclave per host
    os.kill(victims[0], signal.SIGKILL)
    t_kill = time.monotonic()
    status = run.finish(timeout=120)
  finally:
    if run.proc.poll() is None:
      os.killpg(run.proc.pid, signal.SIGKILL)
  out = run.text()
  (tmp_path / "run1.log").write_text(out)
  t_end = max(t for t, _ in run.lines)
  assert status == dist.EXIT_FAILED, out[-4000:]
  # Every process stopped within 30 s of the kill, with the clear error.
  assert t_end - t_kill < 30.0, out[-4000:]
  assert re.search(r"\[p1\] error: process 1 of 2 failed after step \d+: EnclaveDied: ", out)
  assert re.search(r"\[p0\] error: process 1 of 2 \(host [^)]+\) failed after step \d+: "
                   r"EnclaveDied: .*; stopping process 0 too", out), out[-4000:]
  assert re.search(r"process 1 failed \(status 1\); all stopped \(process 0: status "
                   rf"{dist.EXIT_PEER_FAILED}", out), out[-3000:]
  assert not _enclaves(marker)
  assert not (tmp_path / "train" / "summary.json").exists()
  saved = sorted(int(d) for d in os.listdir(tmp_path / "train" / "checkpoints") if d.isdigit())
  assert saved and 4 <= saved[-1] < steps

  # Run 2: the same command resumes from the shared checkpoint and finishes.
  run = _Launch(args)
  try:
    status = run.finish(timeout=400)
  finally:
    if run.proc.poll() is None:
      os.killpg(run.proc.pid, signal.SIGKILL)
  out = run.text()
  assert status == 0, out[-4000:]
  for i in range(2):
    assert f"[p{i}] resumed from checkpoint at step {saved[-1]}" in out
  s = json.loads((tmp_path / "train" / "summary.json").read_text())
  assert s["steps"] == steps and s["resumed_from"] == saved[-1]
  d = s["distributed"]
  assert d["num_processes"] == 2 and d["shard_sizes"] == [2250, 2250]
  assert d["params_identical"] and len(set(d["params_sha256"])) == 1
  digests = re.findall(r"\[p\d\] process \d: final params sha256 ([0-9a-f]{64})", out)
  assert len(digests) == 2 and set(digests) == set(d["params_sha256"])
  # The accounting uses the global batch: 32 of all 4,500 examples, not 16 of 2,250.
  p = s["privacy"]
  assert p["sampling_rate"] == pytest.approx(32 / 4500)
  assert p["num_processes"] == 2 and p["global_batch_size"] == 32 and p["num_train"] == 4500
  assert s["test_examples"] == 500  # both test shards, summed
  assert len(d["enclave_pids"]) == 2
  for pid in d["enclave_pids"]:
    assert not os.path.exists(f"/proc/{pid}") or "enclave_bridge" not in _cmdline(pid)
  assert not _enclaves(marker)

r"""Runs a multi-host training job as N processes on this machine (DESIGN section 10).

  python -m experiments.multihost --num_processes=2 [--workdir=runs/multihost] \
      [--dataset=mnist5k] [train flags, e.g. --config.num_epochs=1]

1. Seals shard ``i`` of ``n`` of ``--dataset`` for each process under
   ``WORKDIR/data`` (each with its own key; once, later runs reuse them) and
   points each process's enclave at its own shard.  ``--dataset=`` skips this
   (in-process backends, or a config whose bridge paths already name shards).
2. Starts ``python -m experiments.train`` N times, joined by
   ``jax.distributed`` through a coordinator on a free localhost port, with
   the shared workdir ``WORKDIR/train``.  Unknown flags go to every process
   (``--config`` defaults to ``experiments/configs/mnist_multihost.py``).
3. Streams their output with a ``[p<i>]`` prefix (also to
   ``WORKDIR/logs/process-<i>.log``).
4. If a process fails, the others stop by themselves (each with an error
   naming the failed process); any still running ``--grace`` seconds later
   are killed.  Ctrl-C (or SIGTERM) interrupts all of them (process 0 saves a
   checkpoint); a second Ctrl-C kills them.  Every process runs in its own
   session and its enclave dies with it, so nothing is left behind.

The exit status is 0 when every process succeeded, else the status of the
process that failed (not of those it stopped), 130 after Ctrl-C.  Rerunning
resumes from the shared checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence, TextIO

from absl import app, flags

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start (>= 1).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/multihost",
                               "Run folder: train/ (shared workdir), data/, logs/, enclave-<i>/.")
_DATASET = flags.DEFINE_string("dataset", "mnist5k",
                               "Data set to seal one shard of per process; empty: do not seal.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory (cifar10, ...).")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).")
_GRACE = flags.DEFINE_float("grace", 30.0,
                            "Seconds the others get to stop by themselves after a process "
                            "fails (or after Ctrl-C) before they are killed.")

#: Exit status of a process that stopped because another one failed
#: (``asymml_jax.distributed.EXIT_PEER_FAILED``; not imported, to keep this
#: launcher free of JAX).
PEER_FAILED = 75

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                              "mnist_multihost.py")


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return int(s.getsockname()[1])


def seal_shards(dataset: str, data_dir: str | None, num_processes: int,
                out_dir: str) -> tuple[str, str]:
  """Seals shard i of n of ``dataset`` for every process (unless already there).

  Each shard gets its own key (``key-<i>.bin``), as on separate hosts.

  Returns:
    ``(sealed_path, key_path)`` patterns with ``{process_id}``.
  """
  from asymml_jax import data
  from enclave_bridge import seal
  os.makedirs(out_dir, exist_ok=True)
  sealed = os.path.join(out_dir, f"{dataset}-{{process_id}}-of-{num_processes}.sealed")
  key = os.path.join(out_dir, "key-{process_id}.bin")
  full = None
  for i in range(num_processes):
    s_i, k_i = sealed.format(process_id=i), key.format(process_id=i)
    if os.path.exists(s_i) and os.path.exists(k_i):
      header = seal.read_header(s_i)  # a damaged container is an error, not a reseal
      if header.get("shard") != {"count": num_processes, "index": i}:
        raise ValueError(f"{s_i} is not shard {i}/{num_processes}: {header.get('shard')}")
      continue
    if full is None:
      full = data.load_dataset(dataset, data_dir)
    if not os.path.exists(k_i):
      seal.generate_key_file(k_i)
    header = seal.seal_shard(full, i, num_processes, s_i, k_i)
    n = next(a["shape"][0] for a in header["arrays"] if a["name"] == "train_labels")
    print(f"[multihost] sealed shard {i}/{num_processes} of {dataset} ({n} training "
          f"examples): {s_i}", flush=True)
  return sealed, key


class Job:
  """The N processes of one run: start, stream, watch, stop."""

  def __init__(self, commands: Sequence[Sequence[str]], log_dir: str, *, grace: float,
               out: TextIO = sys.stdout):
    self.commands, self.log_dir, self.grace, self.out = commands, log_dir, grace, out
    self.procs: list[subprocess.Popen] = []
    self.exit_times: dict[int, float] = {}
    self._lock = threading.Lock()
    self._threads: list[threading.Thread] = []

  def say(self, line: str) -> None:
    with self._lock:
      self.out.write(line + "\n")
      self.out.flush()

  def start(self) -> None:
    os.makedirs(self.log_dir, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for i, cmd in enumerate(self.commands):
      p = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, env=env, start_new_session=True)
      self.procs.append(p)
      self.say(f"[multihost] process {i}: pid {p.pid}")
      t = threading.Thread(target=self._pump, args=(i, p), daemon=True)
      t.start()
      self._threads.append(t)

  def _pump(self, i: int, p: subprocess.Popen) -> None:
    with open(os.path.join(self.log_dir, f"process-{i}.log"), "a") as log:
      for raw in iter(p.stdout.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        log.write(line + "\n")
        log.flush()
        self.say(f"[p{i}] {line}")

  def _signal(self, i: int, sig: int) -> None:
    try:
      os.killpg(self.procs[i].pid, sig)  # the process leads its own session
    except (ProcessLookupError, PermissionError):
      pass

  def _poll(self) -> dict[int, int | None]:
    codes = {}
    for i, p in enumerate(self.procs):
      codes[i] = p.poll()
      if codes[i] is not None and i not in self.exit_times:
        self.exit_times[i] = time.monotonic()
    return codes

  def wait(self) -> int:
    """Watches the processes until all have exited; returns the job's exit status."""
    first: tuple[int, int, float] | None = None  # (process, status, time)
    interrupted_at: float | None = None
    killed: list[int] = []
    while True:
      try:
        codes = self._poll()
        now = time.monotonic()
        if first is None:
          bad = [(self.exit_times[i], i, c) for i, c in codes.items() if c not in (None, 0)]
          if bad:
            t, i, c = min(bad)
            first = (i, c, t)
            if any(c is None for c in codes.values()):
              self.say(f"[multihost] process {i} exited with status {c}; the others should "
                       f"stop within {self.grace:g} s")
        if all(c is not None for c in codes.values()):
          break
        since = [t for t in (first[2] if first else None, interrupted_at) if t is not None]
        if since and now > min(since) + self.grace:
          late = [i for i, c in codes.items() if c is None and i not in killed]
          for i in late:
            self._signal(i, signal.SIGKILL)
          if late:
            killed.extend(late)
            self.say(f"[multihost] killed process(es) {late}: still running "
                     f"{self.grace:g} s after the first failure or interrupt")
        time.sleep(0.05)
      except KeyboardInterrupt:
        if interrupted_at is not None:
          self.say("[multihost] second interrupt: killing every process")
          for i in range(len(self.procs)):
            self._signal(i, signal.SIGKILL)
          continue
        interrupted_at = time.monotonic()
        self.say("[multihost] interrupted: stopping every process (Ctrl-C again to kill)")
        for i in range(len(self.procs)):
          self._signal(i, signal.SIGINT)
    for t in self._threads:
      t.join(timeout=5.0)
    codes = {i: p.returncode for i, p in enumerate(self.procs)}
    if interrupted_at is not None:
      self.say(f"[multihost] interrupted; all stopped (status "
               f"{', '.join(str(c) for c in codes.values())}); rerun to resume")
      return 130
    if first is not None:
      # The cause: the earliest failure that is not "stopped because a peer failed".
      causes = sorted((self.exit_times[i], i) for i, c in codes.items()
                      if c not in (0, PEER_FAILED))
      culprit = causes[0][1] if causes else first[0]
      detail = ", ".join(f"process {i}: status {c}, +{self.exit_times[i] - first[2]:.1f} s"
                         for i, c in codes.items())
      self.say(f"[multihost] process {culprit} failed (status {codes[culprit]}); all "
               f"stopped ({detail} after the first exit)")
      return codes[culprit]
    self.say(f"[multihost] all {len(self.procs)} processes finished (status "
             f"{', '.join(str(c) for c in codes.values())})")
    return 0

  def kill_all(self) -> None:
    """Last resort on the way out: nothing outlives the launcher."""
    for i, p in enumerate(self.procs):
      if p.poll() is None:
        self._signal(i, signal.SIGKILL)
        p.wait()


def commands(num_processes: int, port: int, workdir: str,
             forwarded: Sequence[str], bridge: dict[str, str]) -> list[list[str]]:
  """The command line of every process."""
  args = [a for a in forwarded if a != "--"]
  if not any(a == "--config" or a.startswith("--config=") for a in args):
    args = [f"--config={DEFAULT_CONFIG}"] + args
  overrides = [f"--config.bridge.{k}={v}" for k, v in bridge.items()]
  return [[sys.executable, "-u", "-m", "experiments.train", *args, *overrides,
           f"--workdir={os.path.join(workdir, 'train')}",
           f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
           f"--process_id={i}"] for i in range(num_processes)]


def _interrupt(signum, frame) -> None:
  """SIGTERM: stop the job as Ctrl-C does."""
  del signum, frame
  raise KeyboardInterrupt


def _parse(argv: list[str]) -> list[str]:
  """This script's flags; every other argument is forwarded to experiments.train."""
  return flags.FLAGS(argv, known_only=True)


def main(argv: list[str]) -> None:
  n = _NUM_PROCESSES.value
  if n < 1:
    raise app.UsageError(f"--num_processes must be >= 1, got {n}")
  if _GRACE.value <= 0:
    raise app.UsageError(f"--grace must be > 0, got {_GRACE.value}")
  workdir = os.path.abspath(_WORKDIR.value)
  bridge: dict[str, str] = {}
  if _DATASET.value:
    try:
      sealed, key = seal_shards(_DATASET.value, _DATA_DIR.value, n,
                                os.path.join(workdir, "data"))
    except (ValueError, OSError) as e:
      raise app.UsageError(str(e)) from None
    bridge = {"sealed_path": sealed, "key_path": key,
              "workdir": os.path.join(workdir, "enclave-{process_id}")}
  port = _PORT.value or free_port()
  job = Job(commands(n, port, workdir, argv[1:], bridge), os.path.join(workdir, "logs"),
            grace=_GRACE.value)
  # Ctrl-C and SIGTERM stop the job; also when this launcher was started with
  # SIGINT ignored (in the background), which its children would inherit.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  signal.signal(signal.SIGTERM, _interrupt)
  try:
    job.start()
    status = job.wait()
  finally:
    job.kill_all()
  if status == 0:
    print(f"[multihost] summary: {os.path.join(workdir, 'train', 'summary.json')}", flush=True)
  sys.exit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)

"""The bridge's progress watchdog: a hang becomes a typed error, not a silent wait (DESIGN section 6).

A step in flight is *progressing* while either process burns CPU (the
driver's untrusted compute, a compile, the enclave's trusted stages) or a
bridge call completes.  When neither happens for ``timeout_s`` seconds, one
side is stopped (SIGSTOP, a debugger) or both wait on each other (a
deadlock).  Then:

* a call in flight fails (the client raises ``EnclaveHung`` with
  :meth:`ProgressWatchdog.report`: what the driver waits for and what the
  kernel says the enclave is doing, from ``/proc/PID/status`` and ``wchan``);
* with no call in flight the driver itself is stuck (its callback thread
  waits on something that will not come): the watchdog's thread prints the
  same report and every driver thread's stack and ends the process with
  :data:`EXIT_STALLED` (the enclave goes with it: ``PR_SET_PDEATHSIG``),
  since a thread stuck inside XLA cannot be made to raise.

CPU time is read from ``/proc``; where it cannot be read the process counts
as progressing, so the watchdog never fires on a guess.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import Callable

#: Exit status of a driver stopped by the watchdog (EX_SOFTWARE).
EXIT_STALLED = 70
#: CPU share of one core below which a window counts as idle.
_IDLE_SHARE = 0.01
_TICK_S = 0.25


def cpu_seconds(pid: int) -> float | None:
  """User plus system CPU seconds of process ``pid``; ``None`` if unreadable."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except (OSError, IndexError, ValueError):
    return None


def describe_process(pid: int | None) -> str:
  """What the kernel says ``pid`` is doing: its state and wait channel."""
  if pid is None:
    return "not started"
  state, wchan = "gone", ""
  try:
    with open(f"/proc/{pid}/status") as f:
      state = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("State:")), "?")
    with open(f"/proc/{pid}/wchan") as f:
      wchan = f.read().strip()
  except OSError:
    pass
  return f"state {state}" + (f", waiting in {wchan}" if wchan and wchan != "0" else "")


class ProgressWatchdog:
  """Tracks the CPU time of the driver and the enclave, and calls that complete.

  Args:
    enclave_pid: returns the enclave's pid (``None`` before it starts).
    timeout_s: seconds without progress that count as a hang; ``0`` disables.
    on_driver_stall: called with the report when the driver itself is stuck
      (the default prints stacks and ends the process, see the module doc).
  """

  def __init__(self, enclave_pid: Callable[[], int | None], timeout_s: float = 30.0, *,
               on_driver_stall: Callable[[str], None] | None = None):
    if timeout_s < 0:
      raise ValueError(f"bridge.watchdog_s must be >= 0 (0 disables it), got {timeout_s}")
    self.enclave_pid, self.timeout_s = enclave_pid, float(timeout_s)
    self.on_driver_stall = on_driver_stall or _exit_with_stacks
    self.waiting_for = ""  # the call in flight, e.g. "FORWARD stage 3 of step 12"
    self._armed = 0
    self._lock = threading.Lock()
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._beaten = False
    self._reset()

  @property
  def enabled(self) -> bool:
    return self.timeout_s > 0

  def _cpu(self) -> float | None:
    """Both processes' CPU seconds; ``None`` if the enclave's cannot be read."""
    pid = self.enclave_pid()
    enclave = 0.0 if pid is None else cpu_seconds(pid)
    return None if enclave is None else time.process_time() + enclave

  def _reset(self) -> None:
    now = time.monotonic()
    self._ref_t, self._ref_cpu, self._last_tick = now, self._cpu(), now

  def beat(self) -> None:
    """A bridge call completed (cheap: on every call's path; read at the next sample)."""
    self._beaten = True

  def idle_seconds(self) -> float:
    """Seconds since the last sign of progress (sampling as it goes)."""
    with self._lock:
      now, cpu = time.monotonic(), self._cpu()
      suspended = now - self._last_tick > 8 * _TICK_S  # this process itself was stopped
      self._last_tick, beaten, self._beaten = now, self._beaten, False
      if (beaten or suspended or cpu is None or self._ref_cpu is None
          or cpu - self._ref_cpu > max(0.02, _IDLE_SHARE * (now - self._ref_t))):
        self._ref_t, self._ref_cpu = now, cpu
      return now - self._ref_t

  def stalled(self) -> bool:
    """Whether the call in flight has made no progress for ``timeout_s``."""
    return self.enabled and self.idle_seconds() > self.timeout_s

  def report(self) -> str:
    """One line per side: what it waits on."""
    pid = self.enclave_pid()
    waiting = (f"waiting for the enclave's reply to {self.waiting_for}" if self.waiting_for
               else "not in a bridge call (stuck in its own untrusted program)")
    return (f"no progress for {self.timeout_s:g} s (bridge.watchdog_s): neither process used "
            f"CPU and no bridge call completed.\n  driver (pid {os.getpid()}): {waiting}\n"
            f"  enclave (pid {pid}): {describe_process(pid)}")

  # ------------------------------------------------------- steps in flight
  def arm(self) -> None:
    """A step started: watch it until :meth:`disarm`."""
    if not self.enabled:
      return
    with self._lock:
      self._armed += 1
    self.beat()
    if self._thread is None:
      self._thread = threading.Thread(target=self._watch, name="bridge-watchdog", daemon=True)
      self._thread.start()

  def disarm(self) -> None:
    with self._lock:
      self._armed = max(0, self._armed - 1)

  def close(self) -> None:
    self._stop.set()

  def _watch(self) -> None:
    while not self._stop.wait(_TICK_S):
      if self.waiting_for:  # a call in flight checks itself (BridgeClient._recv)
        continue
      if not self._armed:
        self.beat()
        continue
      if self.idle_seconds() > self.timeout_s:
        self.on_driver_stall(self.report())
        self.beat()


def _exit_with_stacks(report: str) -> None:
  """The default driver-stall action: report, stacks, and exit (see the module doc)."""
  print(f"error: the driver is stuck inside a training or evaluation step; {report}\n"
        f"  the process exits with status {EXIT_STALLED}; rerun the same command to resume "
        "from the last checkpoint.  Driver thread stacks follow.", file=sys.stderr, flush=True)
  faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
  sys.stderr.flush()
  os._exit(EXIT_STALLED)  # noqa: SLF001 - a thread stuck in XLA cannot be made to raise

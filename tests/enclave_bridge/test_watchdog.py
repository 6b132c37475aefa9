"""Tests of enclave_bridge.watchdog: a hang is noticed from CPU time, not guessed (DESIGN 6)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from enclave_bridge import watchdog as wd


@pytest.fixture
def busy_child():
  """A child process that burns CPU until stopped."""
  p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
  yield p
  p.kill()
  p.wait()


def _wait_until(pred, within: float) -> float:
  t0 = time.monotonic()
  while time.monotonic() - t0 < within:
    if pred():
      return time.monotonic() - t0
    time.sleep(0.05)
  raise AssertionError(f"not within {within} s")


def test_a_busy_enclave_is_progress_and_a_stopped_one_is_a_hang(busy_child):
  dog = wd.ProgressWatchdog(lambda: busy_child.pid, timeout_s=1.0)
  time.sleep(1.5)
  assert not dog.stalled()  # it burns CPU
  os.kill(busy_child.pid, signal.SIGSTOP)
  try:
    took = _wait_until(dog.stalled, within=5.0)
    assert took < 2.5
    report = dog.report()
    assert f"enclave (pid {busy_child.pid}): state T (stopped)" in report
    assert "not in a bridge call" in report
    dog.waiting_for = "FORWARD stage 3 of step 12"
    assert "waiting for the enclave's reply to FORWARD stage 3 of step 12" in dog.report()
    dog.beat()  # a completed call is progress
    assert not dog.stalled()
  finally:
    os.kill(busy_child.pid, signal.SIGCONT)


def test_a_busy_driver_is_progress(busy_child):
  os.kill(busy_child.pid, signal.SIGSTOP)  # the enclave does nothing
  stop = threading.Event()
  burner = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)])
  burner.start()
  try:
    dog = wd.ProgressWatchdog(lambda: busy_child.pid, timeout_s=0.8)
    for _ in range(8):
      time.sleep(0.25)
      assert not dog.stalled()
  finally:
    stop.set()
    burner.join()
    os.kill(busy_child.pid, signal.SIGCONT)


def test_a_stuck_driver_is_reported_with_what_it_waits_on():
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  reports = []
  try:
    time.sleep(0.5)  # let it start and go idle
    dog = wd.ProgressWatchdog(lambda: sleeper.pid, timeout_s=0.8,
                              on_driver_stall=reports.append)
    dog.arm()
    _wait_until(lambda: reports, within=5.0)
    assert "driver" in reports[0] and "not in a bridge call" in reports[0]
    dog.disarm()
    n = len(reports)
    time.sleep(1.5)
    assert len(reports) <= n + 1  # disarmed: quiet again
    dog.close()
  finally:
    sleeper.kill()
    sleeper.wait()


def test_settings_are_validated_and_zero_disables():
  with pytest.raises(ValueError, match="watchdog_s"):
    wd.ProgressWatchdog(lambda: None, timeout_s=-1)
  dog = wd.ProgressWatchdog(lambda: None, timeout_s=0)
  assert not dog.enabled and not dog.stalled()
  dog.arm()  # starts nothing
  assert dog._thread is None


def test_proc_readers():
  assert wd.cpu_seconds(os.getpid()) is not None
  assert wd.cpu_seconds(2**22 + 12345) is None  # no such process
  assert "state" in wd.describe_process(os.getpid())
  assert wd.describe_process(None) == "not started"

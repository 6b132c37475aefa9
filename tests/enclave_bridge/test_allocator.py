"""Tests of the trusted process's allocator settings."""

import ctypes

from enclave_bridge import allocator


class _FakeLibc:
  def __init__(self, accept=True):
    self.calls, self.accept = [], accept

  def mallopt(self, param, value):
    self.calls.append((param.value, value.value))
    return 1 if self.accept else 0


def test_keeps_freed_memory_no_mmap_no_trim():
  libc = _FakeLibc()
  assert allocator.reuse_freed_memory(libc) is True
  calls = dict(libc.calls)
  assert calls[allocator.M_MMAP_MAX] == 0
  assert calls[allocator.M_TRIM_THRESHOLD] >= 1 << 30
  assert calls[allocator.M_TOP_PAD] > 0


def test_refused_setting_is_reported_not_raised():
  assert allocator.reuse_freed_memory(_FakeLibc(accept=False)) is False


def test_without_glibc_it_degrades(monkeypatch):
  monkeypatch.setattr(allocator, "_libc", lambda: None)
  assert allocator.reuse_freed_memory() is False


def test_this_process_glibc_accepts_it():
  # glibc's mallopt returns 1 on success; later large allocations still work.
  assert allocator.reuse_freed_memory() is True
  buf = ctypes.create_string_buffer(64 << 20)
  buf[-1] = b"x"
  assert buf[-1] == b"x"

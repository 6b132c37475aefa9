"""Tests of the trusted process's allocator settings."""

import ctypes
import subprocess
import sys
import textwrap

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
  assert calls[allocator.M_ARENA_MAX] == 1


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


_THREAD_ALLOC = textwrap.dedent("""
    import ctypes, resource, sys, threading
    from enclave_bridge import allocator
    if sys.argv[1] == "reuse":
        assert allocator.reuse_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def work(out):
        for i in range(3):  # a worker thread's 86 MB temporary, freed and asked for again
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            p = libc.malloc(86 << 20)
            ctypes.memset(p, 1, 86 << 20)
            libc.free(p)
            out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    out = []
    t = threading.Thread(target=work, args=(out,)); t.start(); t.join()
    print(max(out[1:]))
""")


def _thread_refaults(mode: str) -> int:
  out = subprocess.run([sys.executable, "-c", _THREAD_ALLOC, mode], capture_output=True,
                       text=True, check=True, timeout=60)
  return int(out.stdout.strip())


def test_worker_thread_large_buffers_reuse_warm_pages():
  # glibc default: a thread arena maps each > 64 MB request anew (22k faults of 4 KB).
  assert _thread_refaults("default") > 10_000
  assert _thread_refaults("reuse") < 1_000

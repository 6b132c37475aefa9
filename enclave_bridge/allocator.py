"""Allocator settings of the trusted process: reuse freed memory instead of faulting it in.

XLA CPU allocates a fresh buffer for every output and temporary.  glibc serves
requests above its mmap threshold (at most 32 MB) with a new ``mmap`` and
returns them with ``munmap``, so every large activation is written into pages
the kernel must fault in and zero first: on the benchmark's VMs a 51 MB
projection plus residual ran at 2-3 GB/s that way, and at 12 GB/s into
reused memory.  :func:`reuse_freed_memory` keeps freed memory in the heap
(``M_MMAP_MAX = 0``, trimming off), so that a buffer of the same size reuses
warm pages.  It also keeps every thread in the main arena (``M_ARENA_MAX =
1``): XLA's worker threads otherwise get per-thread arenas of at most 64 MB,
and glibc serves a larger request there with ``mmap`` whatever ``M_MMAP_MAX``
says (an 86 MB temporary of a vgg16 stage at 224x224 was faulted in anew on
every step that way, 21k page faults, about 40 ms).

The enclave server applies it at start, for every backend it serves
(``tee_only`` and ``enclave`` alike: the baseline gets the same allocator).
Freed memory stays with the process, so its resident size stays at its peak;
the peak itself (``VmHWM``) is what the benchmark reports.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TOP_PAD_BYTES = 64 << 20
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest an int takes: no trimming below 2 GB free


def _libc():
  name = ctypes.util.find_library("c")
  if name is None:
    return None
  try:
    lib = ctypes.CDLL(name)
  except OSError:
    return None
  return lib if hasattr(lib, "mallopt") else None


def reuse_freed_memory(libc=None) -> bool:
  """Configures glibc malloc to keep and reuse freed memory (see module doc).

  Args:
    libc: the C library (for tests); found with ``ctypes`` when ``None``.

  Returns:
    Whether every setting took effect; ``False`` (and nothing raised) on a C
    library without glibc's ``mallopt``, where the process runs as before.
  """
  lib = _libc() if libc is None else libc
  if lib is None:
    return False
  settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES), (M_TOP_PAD, TOP_PAD_BYTES),
              (M_ARENA_MAX, 1))
  ok = True
  for param, value in settings:
    ok = bool(lib.mallopt(ctypes.c_int(param), ctypes.c_int(value))) and ok
  return ok

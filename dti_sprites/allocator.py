"""Keep freed memory in the process for reuse: the CPU step's large temporaries stop page-faulting.

A training step allocates and frees tens of large tensors (every candidate of every layer,
rendered and scored: 10-45 MB each). glibc's ``malloc`` serves blocks that large with ``mmap``
and gives them back to the kernel on ``free``, and trims the top of its heap beyond a threshold,
so each new tensor is fresh memory: the kernel maps and zeroes it page by page on first touch.
On the 2-core development machine that made the elementwise work of a Tetrominoes step run at
under 1 GB/s and cost about a third of the step (``benchmarks/notes``, 2026-12-06 training step).
With ``mmap`` and trimming raised to their limit, freed blocks stay in the heap and later
tensors reuse them (not every time: a small allocation in between can split a freed block): the
same step, bit for bit, 1.2× faster on Tetrominoes and 1.8× on CLEVR6 in a side-by-side run.
The process keeps its peak memory instead of returning it (PyTorch's CUDA allocator does the
same on a GPU). Only glibc has ``mallopt``; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
_LIMIT = 2**31 - 1  # mallopt takes a C int

_applied = False


def keep_freed_memory() -> bool:
    """Raise glibc's ``mmap`` and trim thresholds to their limit, once per process.

    Returns whether the setting is in force (False where the C library is not glibc). It is
    process-wide and stays for the life of the process; processes started later with ``fork``
    (data-loader workers) inherit it.
    """
    global _applied
    if _applied:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, _LIMIT)) and bool(mallopt(M_TRIM_THRESHOLD, _LIMIT))
    return _applied

"""Keep freed host memory in the process, so a CPU training step does not page-fault its tensors in every step.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves every block above 32 MB (its largest
``mmap`` threshold) with a fresh ``mmap`` and returns it with ``munmap`` when freed, so the activations and
gradients of a CPU training step (AlexNet at batch 64: many 50–150 MB tensors) are mapped, zero-filled page by page
and unmapped again in every step. Measured on two cores (torch 2.14.1, glibc 2.36), one ``features:alexnet`` step
at batch 64 took 1.5M page faults and 5.1 s of kernel time, and its wall time fell from 10.3 s to 7.0 s with
freed memory kept; the ``inpainting`` step went from 250K faults and 0.73 s of kernel time to 11K and 0.04 s.

:func:`retain_freed_memory` asks glibc (``mallopt``) to serve large blocks from its heap and never to give freed
memory back, which is what PyTorch's own CPU launcher does by preloading jemalloc or tcmalloc with decay
disabled. The price: the process keeps its peak memory until it exits (measured: peak RSS 12–16 % higher). It is
a no-op off glibc (macOS, Windows, musl) and when the user set ``MALLOC_MMAP_MAX_`` or ``MALLOC_TRIM_THRESHOLD_``
(their choice wins); ``CE_PRETRAIN_HOST_MEMORY=release`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["retain_freed_memory"]

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_applied = False


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (large blocks from the heap, no trimming); returns whether it is in
    effect. Idempotent; process-wide; for processes that train on the CPU."""
    global _applied
    if _applied:
        return True
    if os.environ.get("CE_PRETRAIN_HOST_MEMORY", "").lower() == "release":
        return False
    if "MALLOC_MMAP_MAX_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # a block too large for a thread's arena still gets its own mmap: glibc falls back to it whatever M_MMAP_MAX
    _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied

"""Free pages of the C allocator handed back to the OS between the big steps of a CPU op.

glibc keeps freed blocks of up to 32 MiB in its heaps (its mmap threshold rises after each
large free) and returns the top of a heap only above a trim threshold, so the memory a
process shows (resident set, what `top` and container limits see) stays near the largest
working set of any earlier step, not the live allocations.  ``release()`` after a step that
freed large temporaries (a pair of the all-pairs driver, a chunk loop) calls malloc_trim(0),
which unmaps the free pages of every heap: microseconds when there is nothing to free, the
page faults of reuse otherwise, against seconds of arithmetic per step.  Elsewhere (other
C libraries, other OSes) it does nothing.
"""
from __future__ import annotations

import ctypes
import sys

import torch


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def release(device: torch.device) -> None:
    """Hand the allocator's free pages back to the OS (CPU tensors on glibc; otherwise nothing)."""
    if _TRIM is not None and device.type == "cpu":
        _TRIM(0)

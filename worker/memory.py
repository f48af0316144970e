"""What a session costs in memory: the process's resident size, measured around a load, and freed
memory handed back to the operating system.

glibc's malloc keeps freed memory for reuse, so without a trim an evicted session's bytes stay in the
process's RSS and the next load's RSS growth reads as zero (it reuses them). Trimming before and after
a load makes the growth the bytes the new session kept; trimming after an eviction makes the budget
bound RSS, not only our own accounting. Each trim costs well under 3 ms on a few hundred MB of heap
(measured on this repository's 2-core VM), and runs only on loads and evictions, never per request.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Callable, TypeVar

T = TypeVar("T")


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None)  # glibc only; musl and others lack it
    except OSError:
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def trim() -> None:
    """Give memory malloc holds but no object uses back to the OS (a no-op without glibc)."""
    if _TRIM is not None:
        _TRIM(0)


def measured(build: Callable[[], T], floor: int) -> tuple[T, int]:
    """(build(), the bytes it kept resident): the RSS growth across build(), trimmed on both sides,
    and never less than `floor` (the caller's lower bound, e.g. the model file's size), because the
    growth reads low when the build reuses pages that are still mapped."""
    trim()
    before = rss_bytes()
    result = build()
    trim()
    return result, max(floor, rss_bytes() - before)

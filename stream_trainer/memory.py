"""Returning freed heap memory to the operating system (after a swap, a fit, a checkpoint).

A full retrain replaces one fitted model by another: its trees or arrays are allocated in C
(outside Python's allocator) and freed all at once. glibc keeps such freed pages in its
arenas, spread between live blocks, so the resident size of a service that retrains for
hours creeps up although nothing leaks: 211 -> 240 MB over 3M records (RandomForest every
200k records, bench). ``malloc_trim`` hands the free pages back; with it the same run stays
within 208-222 MB.

Every mode also trims after each periodic checkpoint (every 10 s by default): librdkafka's
fetch threads allocate the messages in arenas of their own and the poll loop frees them, so
a per_record service's resident size crept 223 -> 239 MB over 600k records (3 partitions,
bench) and then stayed within 219-237 MB with the trim.

Contract: :func:`release_free_memory` never raises and costs a few milliseconds; it does
nothing where libc has no ``malloc_trim`` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def release_free_memory() -> bool:
    """Give the heap's free pages back to the OS; True if libc could be asked to."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

"""Returning freed heap memory to the operating system (after a swap, a fit, a checkpoint);
the peak and the cap of a hyperparameter search trial's memory (at the end).

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

import contextlib
import ctypes
import functools
from collections.abc import Callable, Iterator


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


# -- per-trial peak and cap (hyperparameter search trials) --------------------------------

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmHWM, VmData, ...), or None where unreadable."""
    try:
        with open(_STATUS, encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_memory() -> bool:
    """Start a new peak of resident memory for this process (Linux: ``5`` to clear_refs
    resets VmHWM). False where the kernel refuses: :func:`peak_memory_mb` then reports the
    process's lifetime peak."""
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def peak_memory_mb() -> float:
    """This process's peak resident memory in MB: since :func:`reset_peak_memory` (VmHWM),
    else over its lifetime (``ru_maxrss``)."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024
    import resource  # noqa: PLC0415  (POSIX only; this module loads everywhere)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def data_limit(extra_mb: int | None) -> Iterator[bool]:
    """While inside, this process may map at most ``extra_mb`` MB more data (heap and private
    writable mappings: Linux ``RLIMIT_DATA`` set to the current VmData plus ``extra_mb``);
    an allocation past it fails (``MemoryError`` in Python and NumPy). The previous limit is
    restored on exit, so a reused worker process is not left capped. Yields whether a cap is
    in force (False for None, or where VmData or RLIMIT_DATA is unavailable)."""
    current = None if extra_mb is None else _status_kib("VmData")
    if extra_mb is None or current is None:
        yield False
        return
    import resource  # noqa: PLC0415

    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = (current * 1024) + extra_mb * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        yield True
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))

"""release_free_memory hands pages freed between live blocks back to the OS."""

from __future__ import annotations

import os
import sys

import pytest

from stream_trainer.laptop.benchmarks.service_run import process_memory
from stream_trainer.operations.memory import release_free_memory


def _rss_bytes() -> float:
    return process_memory(os.getpid())[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc: Linux")
def test_freed_pages_between_live_blocks_are_returned() -> None:
    # 1 KiB bytes objects come from malloc (above pymalloc's 512-byte limit). Keeping every
    # 16th alive pins the heap's top, so glibc cannot shrink it by itself on free.
    blocks = [bytes(1024) for _ in range(120_000)]  # ~125 MB
    kept = blocks[::16]
    del blocks
    before = _rss_bytes()
    assert release_free_memory() is True
    after = _rss_bytes()
    print(f"RSS {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
    assert before - after > 50e6, (before, after)
    assert len(kept) == 7500

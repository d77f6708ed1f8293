"""KSM: pages the kernel merged in the source stay merged through a migration.

The source only reads its memory, and pins it (TCP: mlock) without faulting
anything in for writing, which would give every merged page a copy of its own.
Over verbs the kernel unshares any anonymous page it pins long-term, read-only or
not, so there a registered chunk of merged pages is unmerged until ksmd merges it
again (README, "As a library").
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rdmamig
from kernelmem import PAGE, page_frames

KSM = Path("/sys/kernel/mm/ksm")

pytestmark = pytest.mark.skipif(not (KSM / "run").exists() or os.geteuid() != 0,
                                reason="KSM (CONFIG_KSM) and root to drive ksmd are needed")


@pytest.fixture
def ksmd() -> Iterator[None]:
    """ksmd merging fast; afterwards as it was."""
    settings = ("pages_to_scan", "sleep_millisecs", "run")
    saved = {name: (KSM / name).read_text() for name in settings}
    (KSM / "pages_to_scan").write_text("20000")
    (KSM / "sleep_millisecs").write_text("10")
    (KSM / "run").write_text("1")
    try:
        yield
    finally:
        for name in settings:
            (KSM / name).write_text(saved[name])


@pytest.mark.usefixtures("ksmd")
def test_merged_pages_stay_merged_through_a_migration() -> None:
    memory = mmap.mmap(-1, 32 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pages = np.frombuffer(memory, dtype=np.uint8).reshape(-1, PAGE)
    # Sixteen kinds of page, each many times over: KSM merges them into a few frames.
    kinds = np.random.default_rng(7).integers(1, 256, (16, PAGE), dtype=np.uint8)
    pages[:] = kinds[np.arange(len(pages)) % 16]
    memory.madvise(mmap.MADV_MERGEABLE)
    deadline = time.monotonic() + 300
    while len(np.unique(page_frames(pages))) > len(pages) // 16:
        assert time.monotonic() < deadline, "ksmd did not merge the pages in 5 minutes"
        time.sleep(0.1)
    (KSM / "run").write_text("0")  # merged pages stay merged; no more merging
    before = page_frames(pages)

    received = np.zeros(pages.size, dtype=np.uint8)
    ports: list[int] = []
    receiver = threading.Thread(target=lambda: rdmamig.receive_into(
        "127.0.0.1:0", {"ram": received}, announce=ports.append, timeout=60))
    receiver.start()
    while not ports and receiver.is_alive():
        time.sleep(0.01)
    result = rdmamig.send(f"127.0.0.1:{ports[0]}", {"ram": pages.reshape(-1)})
    receiver.join(60)

    assert result.verified and np.array_equal(received, pages.reshape(-1))
    # Every page is still on the frame KSM merged it into.
    after = page_frames(pages)
    assert np.array_equal(after, before), (
        f"{np.count_nonzero(after != before)} of {len(pages)} pages were unmerged "
        f"({len(np.unique(before))} frames before, {len(np.unique(after))} after)")

"""On an RDMA device: what a verbs migration does to the source's KSM-merged pages
(a figure, not a check: the kernel unshares an anonymous page it pins long-term,
read-only or not, so the registered chunks lose their merging until ksmd merges
them again; tests/test_ksm.py checks that TCP keeps them merged).

    python tests/rxe/ksm_check.py HOST
"""

from __future__ import annotations

import mmap
import sys
import threading
import time
from pathlib import Path

import numpy as np
import rdmamig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernelmem import PAGE, page_frames

KSM = Path("/sys/kernel/mm/ksm")
PORT = 18533


def main() -> None:
    host = sys.argv[1]
    memory = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pages = np.frombuffer(memory, dtype=np.uint8).reshape(-1, PAGE)
    kinds = np.random.default_rng(7).integers(1, 256, (16, PAGE), dtype=np.uint8)
    pages[:] = kinds[np.arange(len(pages)) % 16]
    memory.madvise(mmap.MADV_MERGEABLE)
    (KSM / "pages_to_scan").write_text("20000")
    (KSM / "sleep_millisecs").write_text("10")
    (KSM / "run").write_text("1")
    deadline = time.monotonic() + 600
    while len(np.unique(page_frames(pages))) > len(pages) // 16:
        if time.monotonic() > deadline:
            raise SystemExit("ksmd did not merge the pages in 10 minutes")
        time.sleep(0.2)
    (KSM / "run").write_text("0")
    before = page_frames(pages)
    received = np.zeros(pages.size, dtype=np.uint8)
    ports: list[int] = []
    receiver = threading.Thread(target=lambda: rdmamig.receive_into(
        f"{host}:{PORT}", {"ram": received}, backend="verbs", announce=ports.append,
        timeout=120))
    receiver.start()
    while not ports and receiver.is_alive():
        time.sleep(0.01)
    result = rdmamig.send(f"{host}:{ports[0]}", {"ram": pages.reshape(-1)}, backend="verbs")
    receiver.join(120)
    after = page_frames(pages)
    if not (result.verified and np.array_equal(received, pages.reshape(-1))):
        raise SystemExit("the migration did not verify")
    print(f"verbs: {np.count_nonzero(after != before)} of {len(pages)} KSM-merged pages "
          f"unmerged ({len(np.unique(before))} frames before, {len(np.unique(after))} "
          f"after)")


if __name__ == "__main__":
    main()

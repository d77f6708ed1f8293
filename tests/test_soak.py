"""A listener serving many migrations keeps its memory and file descriptors flat."""

from __future__ import annotations

import threading
from pathlib import Path

from hostile import Service, real_migration, service

MiB = 1 << 20


def _migrate(listener: Service, count: int, *, at_once: int = 1) -> None:
    errors: list[str | None] = []

    def one(seed: int) -> None:
        _result, error, _block = real_migration(listener.port, size=MiB, seed=seed)
        errors.append(error)

    for start in range(0, count, at_once):
        threads = [threading.Thread(target=one, args=(seed,))
                   for seed in range(start, min(start + at_once, count))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert errors == [None] * count


def _settled(listener: Service, served: int) -> tuple[int, int]:
    """(open fds, resident bytes) once each of the first ``served`` migrations has
    been logged (those run at once end in any order)."""
    for number in range(1, served + 1):
        listener.wait_for_log(f"migration {number}:")
    return listener.open_fds(), listener.status("VmRSS")


def test_fifty_in_a_row_and_four_at_once_keep_memory_and_fds_flat(tmp_path: Path) -> None:
    with service(tmp_path / "images", "--max-images", "0") as listener:  # no quota
        _migrate(listener, 10)  # warm up: imports, allocator arenas, thread stacks
        fds, rss = _settled(listener, 10)
        _migrate(listener, 50)
        fds_after_row, rss_after_row = _settled(listener, 60)
        _migrate(listener, 40, at_once=4)
        fds_after_parallel, rss_after_parallel = _settled(listener, 100)
        assert len(listener.images_made()) == 100
    assert fds_after_row == fds and fds_after_parallel == fds
    # A few MiB of allocator slack, never a migration's worth each time.
    assert rss_after_row - rss < 16 * MiB
    assert rss_after_parallel - rss < 24 * MiB

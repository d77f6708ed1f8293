"""The source's meter: after each batch of writes, one timeline sample and the
monitor's figures, then a pause if the writes run ahead of ``max-bandwidth``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ..memory import PAGE_SIZE, RamBlock
from ..pinning import locked_bytes
from ..status import Monitor
from ..transport import Endpoint
from .config import SourceResult


class Meter:
    """Samples a running source and paces its writes.

    Args:
        blocks: the RAM being migrated (what is dirty is what remains).
        endpoint: the source's endpoint (what it has pinned).
        result: the source's figures so far.
        monitor: hears the figures; its ``parameters.max_bandwidth`` may change
            meanwhile.
        started: ``time.monotonic()`` when the migration started.
        on_progress: called with each sample.
    """

    def __init__(self, *, blocks: Sequence[RamBlock], endpoint: Endpoint,
                 result: SourceResult, monitor: Monitor, started: float,
                 on_progress: Callable[[dict[str, float]], None] | None = None) -> None:
        self.blocks = blocks
        self.endpoint = endpoint
        self.result = result
        self.monitor = monitor
        self.started = started
        self.on_progress = on_progress
        self._paced: tuple[float, int, int] | None = None  # (when, bytes, limit)

    def dirty_bytes(self) -> int:
        """Bytes of dirty pages: what is left to send."""
        return sum(block.dirty_pages() for block in self.blocks) * PAGE_SIZE

    def sample(self) -> None:
        """A batch was posted (or a window posted nothing): record where things are,
        then pace."""
        result = self.result
        locked = locked_bytes()
        result.locked_peak_bytes = max(result.locked_peak_bytes, locked)
        dirty, pinned = self.dirty_bytes(), self.endpoint.pinned_bytes
        sample = {"t": time.monotonic() - self.started,
                  "locked_bytes": float(locked),
                  "bytes_written": float(result.bytes_written),
                  "dirty_bytes": float(dirty),
                  "pinned_bytes": float(pinned),
                  "zero_pages": float(result.zero_pages)}
        result.timeline.append(sample)
        self.monitor.update(pinned_bytes=pinned, locked_bytes=locked,
                            transferred=result.bytes_written + result.inline_pages * PAGE_SIZE,
                            remaining=dirty,
                            duplicate=result.duplicate_pages,
                            normal=result.bytes_written // PAGE_SIZE + result.inline_pages)
        if self.on_progress is not None:
            self.on_progress(sample)
        self._pace()

    def _pace(self) -> None:
        """Keep the writes' average at ``max-bandwidth`` (it may change meanwhile:
        pacing starts over from each change)."""
        limit = self.monitor.parameters.max_bandwidth
        if limit is None:
            self._paced = None
            return
        now, written = time.monotonic(), self.result.bytes_written
        if self._paced is None or self._paced[2] != limit:
            self._paced = (now, written, limit)
            return
        ahead = (written - self._paced[1]) / limit - (now - self._paced[0])
        if ahead > 0:
            time.sleep(min(ahead, 1.0))

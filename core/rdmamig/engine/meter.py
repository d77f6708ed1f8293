"""The source's meter: before each batch of writes, a pause if it would run ahead
of ``max-bandwidth`` and the monitor's figures as far as the posted writes go;
after the batches of a post, one timeline sample."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ..errors import MigrationCancelledError
from ..memory import PAGE_SIZE, RamBlock
from ..pinning import locked_bytes
from ..status import Monitor
from ..transport import Endpoint
from .config import SourceResult

#: Credit the pacing keeps for a source that fell behind its limit, in seconds of
#: it: after a pause (a registration, a round trip) writes catch up only this much.
BURST_S = 0.1
#: The smallest piece a paced source posts.
MIN_POST_UNIT = 64 << 10


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
        #: Bytes of the pages the pass under way took as dirty and has not sent yet:
        #: with what is dirty now, what remains (QEMU's ``ram.remaining``).
        self.unsent_bytes = 0
        #: Bytes of writes queued and not posted yet: taken from what is dirty, not
        #: transferred yet either.
        self.unposted_bytes = 0
        #: Bytes of writes completed (the peer has them): what the link carried.
        self.completed_bytes = 0
        #: The pacing's bucket: (bytes of credit, when), None without a limit.
        self._bucket: tuple[float, float] | None = None

    def dirty_bytes(self) -> int:
        """Bytes of dirty pages: what is left to send."""
        return sum(block.dirty_pages() for block in self.blocks) * PAGE_SIZE

    def transferred_bytes(self) -> int:
        """What has gone out: posted writes and inline pages (QEMU's
        ``ram.transferred``)."""
        result = self.result
        return result.bytes_written - self.unposted_bytes + result.inline_pages * PAGE_SIZE

    def remaining_bytes(self) -> int:
        """What is still to go: dirty now, taken by the pass and not sent, or queued
        and not posted (QEMU's ``ram.remaining``)."""
        return self.dirty_bytes() + self.unsent_bytes + self.unposted_bytes

    def sample(self) -> None:
        """Batches were posted (or a window posted nothing): record where things
        are."""
        result = self.result
        locked = locked_bytes()
        result.locked_peak_bytes = max(result.locked_peak_bytes, locked)
        dirty, pinned = self.dirty_bytes(), self.endpoint.pinned_bytes
        sample = {"t": time.monotonic() - self.started,
                  "locked_bytes": float(locked),
                  "bytes_written": float(result.bytes_written),
                  "bytes_completed": float(self.completed_bytes),
                  "dirty_bytes": float(dirty),
                  "pinned_bytes": float(pinned),
                  "zero_pages": float(result.zero_pages)}
        result.timeline.append(sample)
        self.monitor.update(pinned_bytes=pinned, locked_bytes=locked,
                            transferred=self.transferred_bytes(),
                            remaining=dirty + self.unsent_bytes + self.unposted_bytes,
                            duplicate=result.duplicate_pages,
                            normal=result.bytes_written // PAGE_SIZE + result.inline_pages)
        if self.on_progress is not None:
            self.on_progress(sample)

    def post_unit(self) -> int | None:
        """The most bytes to post at once under ``max-bandwidth`` (None without
        one): the credit's worth, so that no burst goes far past the limit."""
        limit = self.monitor.parameters.max_bandwidth
        return None if limit is None else max(int(limit * BURST_S), MIN_POST_UNIT)

    def completed(self, nbytes: int) -> None:
        """``nbytes`` of posted writes completed."""
        self.completed_bytes += nbytes

    def before_post(self, nbytes: int) -> None:
        """Called before ``nbytes`` of queued writes are posted: paced, then counted
        as transferred, so that the figures move with the writes, not with the
        windows that queue them."""
        self._pace(nbytes)
        self.unposted_bytes -= nbytes
        self.monitor.update(transferred=self.transferred_bytes(),
                            remaining=self.remaining_bytes())

    def _pace(self, nbytes: int) -> None:
        """Wait until ``nbytes`` of writes fit ``max-bandwidth`` (read again as it
        waits: it may change). A token bucket: credit accrues at the limit up to
        :data:`BURST_S` worth, a batch waits until the credit is not negative and
        then takes its bytes (going into debt), so the rate over any second stays at
        the limit but for one batch.

        Raises:
            MigrationCancelledError: a cancel came: nothing more is posted.
        """
        while True:
            if self.monitor.parameters.cancel_requested.is_set():
                raise MigrationCancelledError("migration cancelled (migrate_cancel)")
            limit = self.monitor.parameters.max_bandwidth
            now = time.monotonic()
            if limit is None:
                self._bucket = None
                return
            credit, then = self._bucket if self._bucket is not None else (0.0, now)
            credit = min(credit + (now - then) * limit, BURST_S * limit)
            self._bucket = (credit, now)
            if credit >= 0:
                self._bucket = (credit - nbytes, now)
                return
            time.sleep(min(-credit / limit, 0.1))

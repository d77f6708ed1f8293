"""``lru`` and ``memlock``: at most a cap of bytes pinned, least-recently-written
chunks unpinned first (the seed's TODO 6); ``memlock`` takes its cap from
``RLIMIT_MEMLOCK`` (the seed's TODO 1)."""

from __future__ import annotations

import resource
from collections import OrderedDict
from collections.abc import Iterable, Mapping

from rdmamig.errors import UsageError
from rdmamig.pinning import locked_bytes, memlock_limit
from rdmamig.policy import CHUNK_SIZE, ChunkId, PolicyOptions, UnpinPolicy


class Lru(UnpinPolicy):
    """Keep at most ``pin_cap`` bytes pinned; when a registration would pass it,
    unpin the chunks written longest ago. A chunk dirtied again and rewritten moves
    to the recent end, so a hot set that fits under the cap stays pinned."""

    name = "lru"
    description = "at most --pin-cap bytes pinned; least-recently-written chunks go first"

    def __init__(self, options: PolicyOptions) -> None:
        super().__init__(options)
        if options.pin_cap is None:
            raise UsageError(f"policy {self.name!r} needs --pin-cap BYTES")
        self.cap = self._checked_cap(options.pin_cap)
        # Chunks whose writes completed, least recently written first.
        self._recency: OrderedDict[ChunkId, None] = OrderedDict()

    @property
    def pin_cap(self) -> int | None:
        return self.cap

    def _checked_cap(self, cap: int) -> int:
        if cap < 2 * CHUNK_SIZE:
            raise UsageError(f"policy {self.name!r}: a pin cap of {cap} bytes is below "
                             f"two chunks ({2 * CHUNK_SIZE} bytes)")
        return cap

    def chunk_written(self, *, chunk: ChunkId) -> None:
        self._recency[chunk] = None
        self._recency.move_to_end(chunk)

    def chunk_dirtied(self, *, chunk: ChunkId) -> None:
        # Being rewritten: not a candidate until the write completes, and then the
        # most recent of all.
        self._recency.pop(chunk, None)

    def chunk_unpinned(self, *, chunk: ChunkId) -> None:
        self._recency.pop(chunk, None)

    def _candidates(self, pinned: Mapping[ChunkId, int]) -> Iterable[ChunkId]:
        """Eviction order; subclasses reorder it."""
        return (chunk for chunk in self._recency if chunk in pinned)

    def select_unpin(self, *, pinned: Mapping[ChunkId, int], needed_bytes: int) -> Iterable[
            ChunkId]:
        excess = sum(pinned.values()) + needed_bytes - self.cap
        chosen = []
        for chunk in self._candidates(pinned):
            if excess <= 0:
                break
            chosen.append(chunk)
            excess -= pinned[chunk]
        return chosen


class Memlock(Lru):
    """``lru`` with the cap taken from ``RLIMIT_MEMLOCK`` (what is left of it), so a
    migration under ``ulimit -l`` completes instead of failing. ``--pin-cap`` lowers
    it further."""

    name = "memlock"
    description = "lru capped by RLIMIT_MEMLOCK, so migrations fit under ulimit -l"

    #: Headroom for whatever else the process locks.
    MARGIN = CHUNK_SIZE

    def __init__(self, options: PolicyOptions) -> None:
        limit = memlock_limit()
        if limit == resource.RLIM_INFINITY:
            cap = options.pin_cap if options.pin_cap is not None else 2**62
        else:
            cap = limit - locked_bytes() - self.MARGIN
            if options.pin_cap is not None:
                cap = min(cap, options.pin_cap)
        UnpinPolicy.__init__(self, options)
        self.cap = self._checked_cap(cap)
        self._recency = OrderedDict()

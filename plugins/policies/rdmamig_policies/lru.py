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
    unpin the chunks written longest ago.

    Segmented, as SLRU caches are: chunks written once (probation) go before chunks
    that were dirtied and rewritten (protected), each in least-recently-written
    order. A migration scans RAM in address order every iteration, the access
    pattern plain LRU handles worst; the protected segment keeps rewritten – hot –
    chunks pinned while the once-written ones make the room."""

    name = "lru"
    description = "at most --pin-cap bytes pinned; least-recently-written chunks go first"

    def __init__(self, options: PolicyOptions, *, cap: int | None = None) -> None:
        """``cap`` (bytes) overrides ``options.pin_cap``, for subclasses that derive
        their own."""
        super().__init__(options)
        cap = options.pin_cap if cap is None else cap
        if cap is None:
            raise UsageError(f"policy {self.name!r} needs --pin-cap BYTES")
        self.cap = self._checked_cap(cap)
        # Chunks whose writes completed, least recently written first.
        self._recency: OrderedDict[ChunkId, None] = OrderedDict()
        # Chunks written more than once while pinned (the protected segment).
        self._rewritten: set[ChunkId] = set()

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
        # most recent of all, and protected.
        self._recency.pop(chunk, None)
        self._rewritten.add(chunk)

    def chunk_unpinned(self, *, chunk: ChunkId) -> None:
        self._recency.pop(chunk, None)

    def _candidates(self, pinned: Mapping[ChunkId, int]) -> Iterable[ChunkId]:
        """Eviction order: probation, then protected, least recent first."""
        written = [chunk for chunk in self._recency if chunk in pinned]
        return ([c for c in written if c not in self._rewritten]
                + [c for c in written if c in self._rewritten])

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
        super().__init__(options, cap=cap)

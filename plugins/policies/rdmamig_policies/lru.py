"""``lru`` and ``memlock``: at most a cap of bytes pinned, least-recently-rewritten
chunks unpinned first (the seed's TODO 6); ``memlock`` takes its cap from
``RLIMIT_MEMLOCK`` (the seed's TODO 1)."""

from __future__ import annotations

import itertools
import resource
from collections.abc import Iterable, Mapping

from rdmamig.errors import ConfigurationError
from rdmamig.pinning import locked_bytes, memlock_applies, memlock_limit
from rdmamig.policy import CHUNK_SIZE, ChunkId, PolicyOptions, UnpinPolicy

#: A cap no RAM reaches: capped bookkeeping without a limit.
NO_CAP = 2**62


class Lru(UnpinPolicy):
    """Keep at most ``pin_cap`` bytes pinned; when a registration would pass it,
    unpin the chunks written least recently.

    "Recently" is LRU-2's (O'Neil et al., 1993): chunks are ranked by their
    second-to-last write, so a chunk written once goes before any chunk that was
    dirtied and rewritten, and among rewritten chunks the one whose rewrites are
    oldest goes first. A migration scans RAM in address order every round, which
    plain LRU handles worst (the hot set is evicted by the cold tail of each scan);
    ranking by the previous write keeps the chunks rewritten round after round –
    the hot set – pinned. The write history outlives unpinning, so a chunk that
    comes back is known to be hot.
    """

    name = "lru"
    takes_cap = True
    description = "at most --pin-cap bytes pinned; least-recently-rewritten chunks go first"

    def __init__(self, options: PolicyOptions, *, cap: int | None = None) -> None:
        """``cap`` (bytes) overrides ``options.pin_cap``, for subclasses that derive
        their own."""
        super().__init__(options)
        cap = options.pin_cap if cap is None else cap
        if cap is None:
            raise ConfigurationError(f"policy {self.name!r} needs --pin-cap BYTES")
        self.cap = self._checked_cap(cap)
        self._clock = itertools.count(1)
        # chunk -> (second-to-last write, last write), in ticks of _clock; 0 = never.
        self._history: dict[ChunkId, tuple[int, int]] = {}
        # Pinned chunks whose last write completed: the only ones that may go.
        self._settled: set[ChunkId] = set()

    @property
    def pin_cap(self) -> int | None:
        return self.cap

    def _checked_cap(self, cap: int) -> int:
        if cap < 2 * CHUNK_SIZE:
            raise ConfigurationError(f"policy {self.name!r}: a pin cap of {cap} bytes is below "
                             f"two chunks ({2 * CHUNK_SIZE} bytes)")
        return cap

    def chunk_written(self, *, chunk: ChunkId) -> None:
        _before, last = self._history.get(chunk, (0, 0))
        self._history[chunk] = (last, next(self._clock))
        self._settled.add(chunk)

    def chunk_dirtied(self, *, chunk: ChunkId) -> None:
        self._settled.discard(chunk)  # being rewritten: in flight

    def chunk_unpinned(self, *, chunk: ChunkId) -> None:
        self._settled.discard(chunk)

    def _candidates(self, pinned: Mapping[ChunkId, int]) -> Iterable[ChunkId]:
        """Eviction order, first to go first."""
        return sorted((chunk for chunk in self._settled if chunk in pinned),
                      key=self._history.__getitem__)

    def select_unpin(self, *, pinned: Mapping[ChunkId, int], needed_bytes: int) -> Iterable[
            ChunkId]:
        excess = sum(pinned.values()) + needed_bytes - self.cap
        chosen: list[ChunkId] = []
        if excess <= 0:
            return chosen
        for chunk in self._candidates(pinned):
            chosen.append(chunk)
            excess -= pinned[chunk]
            if excess <= 0:
                break
        return chosen


class Memlock(Lru):
    """``lru`` with the cap taken from ``RLIMIT_MEMLOCK`` (what is left of it), so a
    migration under ``ulimit -l`` completes instead of failing. Without a binding
    limit (unlimited, or CAP_IPC_LOCK) there is no cap; ``--pin-cap`` lowers it."""

    name = "memlock"
    description = "lru capped by RLIMIT_MEMLOCK, so migrations fit under ulimit -l"

    #: Headroom for whatever else the process locks.
    MARGIN = CHUNK_SIZE

    def __init__(self, options: PolicyOptions) -> None:
        limit = memlock_limit()
        if limit == resource.RLIM_INFINITY or not memlock_applies():
            cap = options.pin_cap if options.pin_cap is not None else NO_CAP
        else:
            cap = limit - locked_bytes() - self.MARGIN
            if options.pin_cap is not None:
                cap = min(cap, options.pin_cap)
        super().__init__(options, cap=cap)

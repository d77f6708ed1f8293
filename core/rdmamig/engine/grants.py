"""The destination's grant table: which registration holds each chunk of each block.

A source asks for chunks (REGISTER REQUEST) and later names a registration by its
first chunk (UNREGISTER REQUEST). Every chunk is held by one registration at most:
a request inside a registration is answered with it, one that overlaps a
registration without lying inside it is refused, so pinned bytes are counted once
and dropping one registration never unpins another's pages. With PIN_ALL, each
block is one registration made up front, and every request is answered with it.
Bookkeeping only: the destination registers and deregisters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import RemoteProtocolError
from ..transport import MemoryRegion
from ..wire import CHUNK_SIZE

#: In ``owners``: no registration holds the chunk.
FREE = -1


class GrantTable:
    """Registrations granted to the source, per chunk.

    Args:
        chunks: how many chunks each block has, by block index.
    """

    def __init__(self, chunks: Sequence[int]) -> None:
        # Per block, for each chunk: the first chunk of the registration holding it.
        self._owners = [np.full(count, FREE, dtype=np.int64) for count in chunks]
        self._by_first: dict[tuple[int, int], MemoryRegion] = {}
        self._whole: list[MemoryRegion] = []

    @property
    def whole_blocks(self) -> bool:
        """Whether every block is registered whole (PIN_ALL)."""
        return bool(self._whole)

    def whole(self, block: int) -> MemoryRegion:
        """The registration of all of ``block`` (PIN_ALL)."""
        return self._whole[block]

    def holding(self, block: int, first: int, count: int) -> MemoryRegion | None:
        """The registration that holds chunks ``first .. first + count - 1`` of
        ``block`` already, or None if none holds any of them.

        Raises:
            RemoteProtocolError: some are held, by another registration or not all
                by one (the request overlaps a registration without lying inside it).
        """
        if self._whole:
            return self._whole[block]
        owners = self._owners[block][first:first + count]
        head = int(owners[0])
        if head != FREE and bool((owners == head).all()):
            return self._by_first[(block, head)]
        if bool((owners != FREE).any()):
            raise RemoteProtocolError(f"chunks {first}..{first + count - 1} of block {block} "
                                      f"overlap a registration they do not lie inside")
        return None

    def add(self, block: int, first: int, count: int, region: MemoryRegion) -> None:
        """Record ``region``, registered for ``count`` chunks from ``first``."""
        self._by_first[(block, first)] = region
        self._owners[block][first:first + count] = first

    def add_whole(self, regions: Sequence[MemoryRegion]) -> None:
        """Record one registration per block, each the whole block (PIN_ALL)."""
        self._whole = list(regions)

    def remove(self, block: int, first: int) -> MemoryRegion:
        """Forget the registration made for chunk ``first`` of ``block``; returns it.

        Raises:
            RemoteProtocolError: no registration was made for that chunk.
        """
        region = self._by_first.pop((block, first), None)
        if region is None:
            raise RemoteProtocolError(f"key={first}: chunk {first} of block {block} is not "
                                      f"registered")
        self._owners[block][first:first + -(-region.length // CHUNK_SIZE)] = FREE
        return region

    def clear(self) -> list[MemoryRegion]:
        """Forget everything; returns the registrations to deregister."""
        regions = [*self._by_first.values(), *self._whole]
        self._by_first.clear()
        self._whole.clear()
        for owners in self._owners:
            owners[:] = FREE
        return regions

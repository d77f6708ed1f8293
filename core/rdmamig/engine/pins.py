"""The source's pin table: which chunks are registered, under which registration,
and which of them may not be unpinned now.

A registration covers one chunk or, with an rdmamig peer, neighbouring ones (two,
or a window's whole run when nothing is unpinned before the end) under one local
region and one rkey; it is unpinned whole. A chunk is *held* while
a write into it is queued, posted and not yet completed, or while the window being
prepared is about to write it. A held chunk – and any chunk sharing a registration
with one – must not be unpinned: that is the one rule this module keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType

import attrs

from ..policy import ChunkId
from ..transport import MemoryRegion
from .pages import runs_of_consecutive


@attrs.frozen
class Pin:
    """One registration: ``count`` chunks of block ``block`` from chunk ``first``,
    pinned on both sides under one local region and one rkey."""

    block: int
    first: int
    count: int
    region: MemoryRegion
    rkey: int

    def chunks(self) -> list[ChunkId]:
        """The chunks this registration covers."""
        return [ChunkId(self.block, self.first + i) for i in range(self.count)]


class PinTable:
    """Registered chunks and the writes that hold them.

    Args:
        chunk_bytes: the size of a chunk (the last chunk of a block may be short).
    """

    def __init__(self, chunk_bytes: Callable[[ChunkId], int]) -> None:
        self._chunk_bytes = chunk_bytes
        self._pins: dict[ChunkId, Pin] = {}
        self._sizes: dict[ChunkId, int] = {}
        self._sizes_view = MappingProxyType(self._sizes)
        self._holds: dict[ChunkId, int] = {}
        self._ever_unpinned: set[ChunkId] = set()
        self._chunk_total = 0
        #: The most chunk bytes registered at once: what the peer was asked to pin
        #: (each registration pins its chunks there, no more).
        self.peak_bytes = 0

    # ------------------------------------------------------------ registrations

    def __contains__(self, chunk: object) -> bool:
        return chunk in self._pins

    def __bool__(self) -> bool:
        return bool(self._pins)

    def __getitem__(self, chunk: ChunkId) -> Pin:
        return self._pins[chunk]

    def chunks(self) -> Iterator[ChunkId]:
        """Every registered chunk."""
        return iter(self._pins)

    @property
    def sizes(self) -> Mapping[ChunkId, int]:
        """Every registered chunk and its bytes (a read-only live view)."""
        return self._sizes_view

    def registrations(self) -> set[Pin]:
        """Every registration (each once, however many chunks it covers)."""
        return set(self._pins.values())

    @property
    def pinned_bytes(self) -> int:
        """Bytes under registration here."""
        return sum(pin.region.length for pin in self.registrations())

    def add(self, pin: Pin) -> list[tuple[ChunkId, int, bool]]:
        """Record a registration; returns each of its chunks with its bytes and
        whether it had been unpinned before (a re-registration)."""
        added = []
        for cid in pin.chunks():
            self._pins[cid] = pin
            self._sizes[cid] = size = self._chunk_bytes(cid)
            self._chunk_total += size
            added.append((cid, size, cid in self._ever_unpinned))
        self.peak_bytes = max(self.peak_bytes, self._chunk_total)
        return added

    def remove(self, pin: Pin) -> list[ChunkId]:
        """Forget a registration; returns its chunks."""
        chunks = pin.chunks()
        for cid in chunks:
            del self._pins[cid]
            self._chunk_total -= self._sizes.pop(cid)
            self._ever_unpinned.add(cid)
        return chunks

    def clear(self) -> list[MemoryRegion]:
        """Forget everything; returns the regions to deregister."""
        regions = [pin.region for pin in self.registrations()]
        self._pins.clear()
        self._sizes.clear()
        self._chunk_total = 0
        return regions

    # ------------------------------------------------------------ what may go

    def hold(self, chunk: ChunkId) -> None:
        """A write into ``chunk`` is on its way (or about to be): keep it pinned."""
        self._holds[chunk] = self._holds.get(chunk, 0) + 1

    def release(self, chunk: ChunkId) -> None:
        """One :meth:`hold` of ``chunk`` is over (its write completed)."""
        left = self._holds[chunk] - 1
        if left:
            self._holds[chunk] = left
        else:
            del self._holds[chunk]

    def held(self, chunk: ChunkId) -> bool:
        """Whether a write into ``chunk`` is queued, in flight or about to be."""
        return chunk in self._holds

    def tied(self, pin: Pin) -> bool:
        """Whether ``pin`` must stay: a chunk it covers is held."""
        return any(cid in self._holds for cid in pin.chunks())

    def candidates(self) -> tuple[Mapping[ChunkId, int], int]:
        """What a capped policy may choose from: the registered chunks whose
        registration is not tied, and the bytes of those that are (which must fit
        under its cap as well)."""
        if not self._holds:
            return self._sizes_view, 0
        tied = {cid for cid, pin in self._pins.items() if self.tied(pin)}
        if not tied:
            return self._sizes_view, 0
        return ({cid: size for cid, size in self._sizes.items() if cid not in tied},
                sum(self._sizes[cid] for cid in tied))

    def pinned_first(self, block: int, chunks: list[int]) -> list[int]:
        """Dirty chunks of ``block`` that are still registered go before those that
        must be registered (each group in address order). Under a cap, the
        registrations of the round then evict chunks this round has already written,
        not registered chunks it is about to write: a hot set larger than the cap
        keeps the part that fits pinned, where an address-order scan would evict each
        hot chunk just before its next write."""
        if not self._pins:
            return chunks
        pinned = [c for c in chunks if ChunkId(block, c) in self._pins]
        if not pinned:
            return chunks
        taken = set(pinned)
        return pinned + [c for c in chunks if c not in taken]

    def unpinnable(self, chunks: Iterable[ChunkId]) -> list[Pin]:
        """The registrations of ``chunks`` that may go now, each once; one tied to
        a held chunk stays for a later decision."""
        return [pin for pin in dict.fromkeys(self._pins[cid] for cid in chunks)
                if not self.tied(pin)]


def registration_units(chunks: Iterable[ChunkId], *, pairs: bool,
                       runs: bool = False) -> list[tuple[int, int, int]]:
    """(block, first chunk, count) to register for ``chunks``, in order. With
    ``pairs`` (an rdmamig peer, which negotiates BATCH), an even chunk and the next
    one are registered together: 2 MiB, aligned, so pinning keeps the memory's
    transparent huge pages whole (a 1 MiB mlock splits them, which costs much more)
    and writes merge over both. With ``runs`` as well (a policy that unpins nothing
    before the end, so no registration need be small), each run of consecutive
    chunks is one registration: one pin on each side instead of one per pair."""
    if pairs and runs:
        by_block: dict[int, list[int]] = {}
        for cid in sorted(set(chunks)):
            by_block.setdefault(cid.block, []).append(cid.index)
        return [(block, first, end - first) for block, indices in by_block.items()
                for first, end in runs_of_consecutive(indices)]
    wanted = set(chunks)
    units = []
    for cid in sorted(wanted):
        partner = ChunkId(cid.block, cid.index + 1)
        if pairs and cid.index % 2 == 0 and partner in wanted:
            units.append((cid.block, cid.index, 2))
            wanted.discard(partner)
        elif cid in wanted:
            units.append((cid.block, cid.index, 1))
    return units

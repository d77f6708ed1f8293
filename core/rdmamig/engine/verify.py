"""Verification while the data moves (Capability.CHUNK_HASHES,
docs/protocol-extensions.md).

A block's digest is taken over the digests of its 1 MiB chunks, so a chunk can be
hashed as soon as its data is final rather than all of them after the transfer:

- the source (:class:`SentChunks`) hashes a chunk beside its writes, if its memory
  can no longer change (it is stopped, or nothing but its own dirty marks changes
  it: no workload, no tracker): on the backend's sending thread just before it
  sends them where it has one (TCP), else once they are posted; it names those
  chunks and their digests in CHUNK HASHES, sent after the writes. A chunk dirtied
  again is forgotten, and hashed and named again when it is written again;
- the destination (:class:`ArrivedChunks`) hashes a chunk as a write covering it
  whole lands, where the endpoint reports its placements (TCP), from cache on the
  thread that placed it; it takes CHUNK HASHES after the writes before it have
  been placed, as any control message, and hashes the chunks named that were not
  hashed so, on a thread of its own while later data arrives, comparing each with
  the source's digest; the last hash of a chunk named again is the one that
  counts, and a chunk its control messages (COMPRESS, PAGES) changed after its
  last naming is hashed again at the end.

Hashing in the threads that move the data, while it is in cache, costs a verified
transfer little over an unverified one; on other threads it competed with the
moving for CPUs and memory (benchmarks/README.md).

At the end each side hashes only the chunks not taken so, and the block digests
are compared as without CHUNK HASHES.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import threading
from collections.abc import Iterable, Sequence

import numpy as np

from .. import wire
from ..errors import RemoteProtocolError
from ..memory import PAGE_SIZE, PAGES_PER_CHUNK, BoolArray, RamBlock
from ..pinning import buffer_address
from ..policy import ChunkId
from ..wire import CHUNK_SIZE

#: A whole chunk's pages, all populated: a write placed there just now.
_ALL_PAGES = np.ones(PAGES_PER_CHUNK, dtype=bool)


class SentChunks:
    """The source's chunk digests, taken beside their writes: :meth:`posted` may
    run on a backend's sending thread, the rest on the source's."""

    def __init__(self, blocks: Sequence[RamBlock]) -> None:
        self.blocks = blocks
        self._lock = threading.Lock()
        #: Per block: chunk index -> digest.
        self.known: list[dict[int, bytes]] = [{} for _ in blocks]
        self._unsent: list[wire.ChunkHash] = []
        self._populated: list[BoolArray | None] = [None for _ in blocks]
        #: Chunk digests named so far.
        self.named = 0

    def new_pass(self, block: int, dirty_chunks: BoolArray, populated: BoolArray) -> None:
        """A pass over ``block`` starts: chunks dirtied again (``dirty_chunks``, one
        per chunk) are no longer known, and are hashed again when they are written
        again, as the pass sends them: the pages ``populated`` (one per page, as the
        kernel said at the pass's start) with their content, the others as zero."""
        with self._lock:
            known = self.known[block]
            for index in [index for index in known if dirty_chunks[index]]:
                del known[index]
            self._populated[block] = populated

    def posted(self, chunks: Iterable[ChunkId]) -> None:
        """Hash ``chunks``, whose writes are posted and whose memory is final."""
        for cid in chunks:
            populated = self._populated[cid.block]
            first = cid.index * PAGES_PER_CHUNK
            digest = self.blocks[cid.block].chunk_digest(
                cid.index, None if populated is None
                else populated[first:first + PAGES_PER_CHUNK])
            with self._lock:
                self.known[cid.block][cid.index] = digest
                self._unsent.append(wire.ChunkHash(block_idx=cid.block, chunk=cid.index,
                                                   digest=digest))

    def messages(self) -> list[wire.ChunkHashes]:
        """The CHUNK HASHES of the chunks hashed since the last call (and forget
        them): sent after the writes of those chunks were posted."""
        with self._lock:
            unsent, self._unsent = self._unsent, []
        self.named += len(unsent)
        return [wire.ChunkHashes(entries=tuple(unsent[at:at + wire.MAX_REPEAT]))
                for at in range(0, len(unsent), wire.MAX_REPEAT)]

    def block_digests(self) -> list[bytes]:
        """Every block's digest, hashing only the chunks not hashed yet."""
        return [block.digest(known) for block, known in zip(self.blocks, self.known,
                                                             strict=True)]


class ArrivedChunks:
    """The destination's side: hashes the chunks CHUNK HASHES names, on a thread of
    its own, and remembers those that differ from the source's digest. Each chunk
    may be named once a pass (so hashing is bounded by what a pass may carry,
    whatever a peer sends). :meth:`close` must be called before the blocks are
    unmapped.

    Where the endpoint reports each write it places (:meth:`placed`), a chunk a
    write covers whole is hashed there and then, from cache; naming it takes that
    digest, unless something changed the chunk since."""

    def __init__(self, blocks: Sequence[RamBlock]) -> None:
        self.blocks = blocks
        # Per block: chunk index -> the digest taken when a write covering it whole
        # was placed, until it is named or changed. Guarded by the lock: placing
        # threads fill it.
        self._placed: list[dict[int, bytes]] = [{} for _ in blocks]
        self._lock = threading.Lock()
        self._starts = sorted((buffer_address(block.view), index)
                              for index, block in enumerate(blocks) if block.length)
        #: Per block: chunk index -> our digest.
        self.known: list[dict[int, bytes]] = [{} for _ in blocks]
        #: (block index, chunk) whose last digest differs from the source's.
        self.mismatched: set[tuple[int, int]] = set()
        self._named: list[set[int]] = [set() for _ in blocks]
        # Per block and chunk: changed by a control message since it was last named.
        self._stale = [np.zeros(block.chunks, dtype=bool) for block in blocks]
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="rdmamig-verify")
        self._pending: list[concurrent.futures.Future[None]] = []

    def check(self, entries: Sequence[wire.ChunkHash]) -> None:
        """Queue ``entries`` for hashing once they are checked.

        Raises:
            RemoteProtocolError: a block or chunk that does not exist, or a chunk
                named before.
        """
        for entry in entries:
            if entry.block_idx >= len(self.blocks):
                raise RemoteProtocolError(
                    f"block_idx={entry.block_idx}: CHUNK HASHES names no such RAM block "
                    f"(there are {len(self.blocks)})")
            block = self.blocks[entry.block_idx]
            if entry.chunk >= block.chunks:
                raise RemoteProtocolError(
                    f"chunk={entry.chunk}: CHUNK HASHES names a chunk past "
                    f"the {block.chunks} of block {entry.block_idx} ({block.name})")
            if entry.chunk in self._named[entry.block_idx]:
                raise RemoteProtocolError(
                    f"chunk={entry.chunk}: CHUNK HASHES names chunk {entry.chunk} of block "
                    f"{entry.block_idx} ({block.name}) twice in one pass")
            self._named[entry.block_idx].add(entry.chunk)
            self._stale[entry.block_idx][entry.chunk] = False
        with self._lock:
            taken = [self._placed[entry.block_idx].pop(entry.chunk, None) for entry in entries]
        # Through the hashing thread even when all were taken: a chunk's digests
        # are recorded in the order it was named.
        self._pending.append(self._executor.submit(self._hash, list(entries), taken))

    def placed(self, addr: int, length: int) -> None:
        """A write of ``length`` bytes landed at virtual address ``addr``: hash the
        chunks it covers whole, now; forget the digests of those it covers in part."""
        at = bisect.bisect_right(self._starts, (addr, len(self.blocks))) - 1
        if at < 0:
            return
        start, index = self._starts[at]
        block = self.blocks[index]
        offset = addr - start
        if offset + length > block.length or length <= 0:
            return
        first = offset // CHUNK_SIZE
        last = (offset + length - 1) // CHUNK_SIZE
        whole = range(-(-offset // CHUNK_SIZE),
                      last + 1 if offset + length in ((last + 1) * CHUNK_SIZE, block.length)
                      else last)
        digests = {chunk: block.chunk_digest(chunk, _ALL_PAGES[:block.chunk_bytes(chunk)
                                                               // PAGE_SIZE])
                   for chunk in whole}
        with self._lock:
            placed = self._placed[index]
            for chunk in range(first, last + 1):
                placed.pop(chunk, None)
            placed.update(digests)

    def changed(self, block: int, start: int, length: int) -> None:
        """``length`` bytes at ``start`` of block ``block`` were written by a control
        message: their chunks' digests, if taken, are taken again at the end."""
        if length > 0:
            chunks = range(start // CHUNK_SIZE, (start + length - 1) // CHUNK_SIZE + 1)
            self._stale[block][chunks.start:chunks.stop] = True
            with self._lock:
                for chunk in chunks:
                    self._placed[block].pop(chunk, None)

    def new_pass(self) -> None:
        """A pass ended (REGISTER FINISHED): chunks may be named again."""
        for named in self._named:
            named.clear()

    def _hash(self, entries: list[wire.ChunkHash], taken: list[bytes | None]) -> None:
        # One thread, in order: a chunk's last hash is the one that stays. The
        # kernel is asked which pages are populated once per block, over the
        # chunks named and not taken when placed, not per chunk.
        for entry, digest in zip(entries, taken, strict=True):
            if digest is not None:
                self._record(entry, digest)
        entries = [entry for entry, digest in zip(entries, taken, strict=True) if digest is None]
        spans: dict[int, tuple[int, int]] = {}
        for entry in entries:
            low, high = spans.get(entry.block_idx, (entry.chunk, entry.chunk))
            spans[entry.block_idx] = (min(low, entry.chunk), max(high, entry.chunk))
        populated = {index: (low, self.blocks[index].populated_pages(
            low * PAGES_PER_CHUNK, min((high + 1) * PAGES_PER_CHUNK, self.blocks[index].pages)))
            for index, (low, high) in spans.items()}
        for entry in entries:
            low, pages = populated[entry.block_idx]
            first = (entry.chunk - low) * PAGES_PER_CHUNK
            self._record(entry, self.blocks[entry.block_idx].chunk_digest(
                entry.chunk, pages[first:first + PAGES_PER_CHUNK]))

    def _record(self, entry: wire.ChunkHash, ours: bytes) -> None:
        self.known[entry.block_idx][entry.chunk] = ours
        if ours == entry.digest:
            self.mismatched.discard((entry.block_idx, entry.chunk))
        else:
            self.mismatched.add((entry.block_idx, entry.chunk))

    def block_digests(self) -> list[bytes]:
        """Every block's digest, once the queued chunks are hashed, hashing only the
        chunks CHUNK HASHES did not name."""
        for future in self._pending:
            future.result()
        self._pending.clear()
        for index, (known, stale) in enumerate(zip(self.known, self._stale, strict=True)):
            for chunk in [chunk for chunk in known if stale[chunk]]:
                del known[chunk]
                self.mismatched.discard((index, chunk))
        return [block.digest(known) for block, known in zip(self.blocks, self.known,
                                                             strict=True)]

    def close(self) -> None:
        """Drop what is queued and wait for the chunk being hashed."""
        self._executor.shutdown(wait=True, cancel_futures=True)

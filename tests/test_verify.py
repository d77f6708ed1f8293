"""Verification while the data moves: CHUNK HASHES (docs/protocol-extensions.md)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from conftest import Migration
from kernelmem import PAGE, allocated, sparse_file
from rdmamig import wire
from rdmamig.engine import RamBlock
from rdmamig.engine.verify import ArrivedChunks, SentChunks
from rdmamig.errors import VerificationError
from rdmamig.memory import content_digest
from rdmamig.pinning import buffer_address
from rdmamig.policy import ChunkId, PolicyOptions
from rdmamig_policies.pin_until_done import PinUntilDone
from rdmamig_tcp.endpoint import TcpEndpoint
from test_destination import against_a_destination, refused

MiB = 1 << 20


def _random_block(size: int, *, zero_chunks: tuple[int, ...] = ()) -> RamBlock:
    block = RamBlock.anonymous("ram0", size)
    block.array[:] = np.random.default_rng(5).integers(0, 256, size, dtype=np.uint8)
    for chunk in zero_chunks:
        block.array[chunk * MiB:(chunk + 1) * MiB] = 0
    return block


def test_every_written_chunk_is_hashed_as_it_moves_on_both_sides(
        migration: Migration) -> None:
    block = _random_block(16 * MiB, zero_chunks=(3, 7))
    migration.run([block])
    assert migration.source_error is None and migration.destination_error is None
    source, destination = migration.source, migration.destination
    assert source is not None and destination is not None
    assert source.result.verified and destination.result.verified
    # The 14 chunks that hold data were written, so named; the two zero chunks went
    # as COMPRESS and were hashed at the end.
    assert source.result.chunk_hashes == 14
    assert destination.result.chunks_hashed_on_arrival == 14


@pytest.mark.parametrize("watched", [True, False], ids=["hashed-as-placed", "hashed-when-named"])
def test_a_chunk_that_differs_on_arrival_is_named(migration: Migration,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  watched: bool) -> None:
    # As if the data path had flipped a byte of chunk 5 before it was hashed: as it
    # landed, where the endpoint reports its writes (TCP), else before the hashing
    # thread took it (as with RDMA, which reports none).
    flip = 5 * MiB + 100
    if watched:
        original_placed = ArrivedChunks.placed

        def corrupting_placed(self: ArrivedChunks, addr: int, length: int) -> None:
            base = buffer_address(self.blocks[0].view)
            if addr <= base + flip < addr + length:
                self.blocks[0].array[flip] ^= 0xFF
            original_placed(self, addr, length)

        monkeypatch.setattr(ArrivedChunks, "placed", corrupting_placed)
    else:
        original_hash = ArrivedChunks._hash

        def corrupting_hash(self: ArrivedChunks, entries: list[wire.ChunkHash],
                            taken: list[bytes | None]) -> None:
            if any(entry.chunk == 5 for entry in entries):
                self.blocks[0].array[flip] ^= 0xFF
            original_hash(self, entries, taken)

        monkeypatch.setattr(TcpEndpoint, "watch_placements", lambda self, placed: False)
        monkeypatch.setattr(ArrivedChunks, "_hash", corrupting_hash)
    migration.run([_random_block(8 * MiB)])
    assert isinstance(migration.destination_error, VerificationError)
    assert "hash mismatch in block(s) ram0; chunk 5 of ram0 (offset 0x500000)" in str(
        migration.destination_error)
    assert migration.source_error is not None


def test_chunks_written_whole_over_tcp_are_hashed_as_they_land(
        migration: Migration, monkeypatch: pytest.MonkeyPatch) -> None:
    # The TCP endpoint reports each write it places: every chunk of a static
    # source goes in whole writes, so naming it finds its digest taken already and
    # the hashing thread reads none of them.
    read_when_named: list[int] = []
    original_hash = ArrivedChunks._hash

    def counting(self: ArrivedChunks, entries: list[wire.ChunkHash],
                 taken: list[bytes | None]) -> None:
        read_when_named.extend(entry.chunk for entry, digest
                               in zip(entries, taken, strict=True) if digest is None)
        original_hash(self, entries, taken)

    monkeypatch.setattr(ArrivedChunks, "_hash", counting)
    migration.run([_random_block(16 * MiB)])
    destination = migration.destination
    assert destination is not None and destination.result.verified
    assert destination.result.chunks_hashed_on_arrival == 16
    assert read_when_named == []


def test_the_source_hashes_each_batch_on_the_lane_that_sends_it(
        migration: Migration, monkeypatch: pytest.MonkeyPatch) -> None:
    # Just before it sends them: the copy that follows finds them in cache.
    threads: set[str] = set()
    original = SentChunks.posted

    def recording(self: SentChunks, chunks: Iterable[ChunkId]) -> None:
        threads.add(threading.current_thread().name)
        original(self, chunks)

    monkeypatch.setattr(SentChunks, "posted", recording)
    migration.run([_random_block(16 * MiB)])
    assert migration.source is not None and migration.source.result.chunk_hashes == 16
    assert threads == {"rdmamig-tcp-tx0"}


def _placed_whole(arrived: ArrivedChunks, block: RamBlock, chunk: int) -> None:
    arrived.placed(buffer_address(block.view) + chunk * MiB, MiB)


@pytest.mark.parametrize("change", ["a write of part of it", "a control message"])
def test_a_chunk_changed_after_it_was_hashed_as_placed_is_hashed_again(change: str) -> None:
    # Chunk 1 lands whole and is hashed; then one page of it changes – by a later
    # write that covers it in part, or by COMPRESS / PAGES – before the source names
    # it with the digest of what it holds now: that digest must agree.
    block = _random_block(4 * MiB)
    arrived = ArrivedChunks([block])
    try:
        _placed_whole(arrived, block, 1)
        block.array[MiB + 3 * PAGE:MiB + 4 * PAGE] = 7
        if change == "a control message":
            arrived.changed(0, MiB + 3 * PAGE, PAGE)
        else:
            arrived.placed(buffer_address(block.view) + MiB + 3 * PAGE, PAGE)
        arrived.check([wire.ChunkHash(block_idx=0, chunk=1, digest=block.chunk_digest(1))])
        arrived.block_digests()
    finally:
        arrived.close()
    assert arrived.mismatched == set() and sorted(arrived.known[0]) == [1]


def test_a_write_hashes_only_the_chunks_it_covers_whole() -> None:
    # A write from the middle of chunk 0 to the end of a block whose last chunk is
    # short: chunks 1 and 2 (the short one) are covered whole and hashed as placed;
    # chunk 0 is not, and is hashed when named. Each then changes without a word,
    # as no write or message would change it: only a digest taken when named
    # agrees with the source's digest of what it holds then.
    block = RamBlock.anonymous("ram0", 2 * MiB + 16 * PAGE)
    block.array[:] = 9
    arrived = ArrivedChunks([block])
    try:
        arrived.placed(buffer_address(block.view) + 5 * PAGE, block.length - 5 * PAGE)
        for chunk in range(3):
            block.array[chunk * MiB] = 1
        arrived.check([wire.ChunkHash(block_idx=0, chunk=chunk, digest=block.chunk_digest(chunk))
                       for chunk in range(3)])
        arrived.block_digests()
    finally:
        arrived.close()
    assert arrived.mismatched == {(0, 1), (0, 2)}


def test_a_chunk_zeroed_after_it_was_named_is_hashed_again_at_the_end(
        migration: Migration) -> None:
    # Pass 1 writes chunk 2 and names it; it is then zeroed and marked dirty, so
    # pass 2 sends it as COMPRESS, which names nothing: the destination's digest of
    # it from pass 1 must not be the one compared.
    block = _random_block(8 * MiB)

    class ZeroesAfterBulk(PinUntilDone):
        def iteration_ended(self, *, iteration: int) -> None:
            super().iteration_ended(iteration=iteration)
            if iteration == 0:
                block.array[2 * MiB:3 * MiB] = 0
                block.mark_dirty(2 * MiB, MiB)

    migration.run([block], policy=ZeroesAfterBulk(PolicyOptions()))
    assert migration.source_error is None and migration.destination_error is None
    destination = migration.destination
    assert destination is not None and destination.result.verified
    assert destination.result.zero_pages >= 256
    assert destination.result.chunks_hashed_on_arrival == 7


@pytest.mark.parametrize(("entries", "error"), [
    ([(2, 0)], "block_idx=2: CHUNK HASHES names no such RAM block (there are 2)"),
    ([(1, 2)], "chunk=2: CHUNK HASHES names a chunk past the 2 of block 1 (ram1)"),
    ([(0, 0), (0, 0)], "chunk=0: CHUNK HASHES names chunk 0 of block 0 (ram0) twice in "
                       "one pass"),
])
def test_chunk_hashes_naming_what_does_not_exist_or_twice_are_refused(
        entries: list[tuple[int, int]], error: str) -> None:
    with against_a_destination(MiB, 2 * MiB) as (source, destination, _blocks):
        reason = refused(destination, source, wire.ChunkHashes(entries=tuple(
            wire.ChunkHash(block_idx=block, chunk=chunk, digest=bytes(16))
            for block, chunk in entries)))
        assert error in reason


def test_chunks_named_on_arrival_are_hashed_without_reading_a_hole(shm_file: Path) -> None:
    # A destination block in a tmpfs file, where reading a hole allocates it: chunk
    # 2 holds data throughout, chunk 5 one page. Named together (chunk 2 first), the
    # hashes read only those pages, and each agrees with the source's digest.
    content = {2 * MiB: os.urandom(MiB), 5 * MiB + 7 * PAGE: os.urandom(PAGE)}
    sparse_file(shm_file, 8 * MiB, content)
    before = allocated(shm_file)
    block = RamBlock.from_file("ram0", shm_file)
    named = [wire.ChunkHash(block_idx=0, chunk=chunk, digest=block.chunk_digest(chunk))
             for chunk in (2, 5)]
    assert allocated(shm_file) == before == MiB + PAGE
    arrived = ArrivedChunks([block])
    try:
        arrived.check(named)
        digests = arrived.block_digests()
    finally:
        arrived.close()
    assert allocated(shm_file) == before
    assert arrived.mismatched == set() and sorted(arrived.known[0]) == [2, 5]
    assert digests == [content_digest(shm_file.read_bytes())]

"""Populated memory only: what the kernel says holds data, and that a migration,
the checksum tracker and the digest never read (so never allocate) the rest."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest
import xxhash
from conftest import Migration
from kernelmem import PAGE, allocated, sparse_file
from rdmamig import populated
from rdmamig.engine import ChecksumTracker, RamBlock
from rdmamig.memory import content_digest
from rdmamig.populated import Everything, FileExtents, PrivateAnonymous, is_private_anonymous

MiB = 1 << 20


def test_block_digest_is_xxh3_128_over_its_chunk_digests() -> None:
    block = RamBlock.anonymous("b", 2 * MiB + 3 * PAGE)
    block.array[:] = np.random.default_rng(1).integers(0, 256, block.length, dtype=np.uint8)
    chunks = [bytes(block.view[at:at + MiB]) for at in range(0, block.length, MiB)]
    expected = xxhash.xxh3_128_digest(b"".join(xxhash.xxh3_128_digest(c) for c in chunks))
    assert block.digest() == expected == content_digest(block.view)


def test_file_extents_are_the_pages_written(shm_file: Path) -> None:
    sparse_file(shm_file, 4 * MiB, {0: b"a", 5 * PAGE + 100: b"b" * PAGE, 3 * MiB: b"c" * MiB})
    block = RamBlock.from_file("f", shm_file)
    assert isinstance(block.residency, FileExtents)
    expected = np.zeros(block.pages, dtype=np.bool_)
    expected[[0, 5, 6]] = True
    expected[3 * MiB // PAGE:] = True
    assert block.populated_pages(0, block.pages).tolist() == expected.tolist()
    assert block.populated_pages(4, 8).tolist() == [False, True, True, False]


def test_pagemap_tells_the_pages_of_private_anonymous_memory() -> None:
    block = RamBlock.anonymous("a", 64 * PAGE, populate=False)
    assert isinstance(block.residency, PrivateAnonymous)
    assert not block.populated_pages(0, 64).any()
    block.array[7 * PAGE] = 1
    block.array[40 * PAGE + 5] = 2
    assert np.flatnonzero(block.populated_pages(0, 64)).tolist() == [7, 40]


def test_only_private_anonymous_mappings_are_judged_by_pagemap() -> None:
    # A large numpy allocation is its own private anonymous mapping.
    assert isinstance(RamBlock("n", np.zeros(16 * MiB, dtype=np.uint8)).residency,
                      PrivateAnonymous)
    shared = mmap.mmap(-1, 16 * PAGE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    assert isinstance(RamBlock("s", shared).residency, Everything)
    maps = "1000-3000 rw-p 00000000 00:00 0 \n3000-5000 rw-s 00000000 00:01 7 /dev/zero\n"
    assert is_private_anonymous(0x1000, 0x2000, maps=maps)
    assert not is_private_anonymous(0x1000, 0x3000, maps=maps)  # runs into a shared one
    assert not is_private_anonymous(0x800, 0x1000, maps=maps)   # starts unmapped


def test_a_digest_reads_no_hole(shm_file: Path) -> None:
    data = {PAGE: b"x" * 3 * PAGE, 2 * MiB + 17: b"y"}
    sparse_file(shm_file, 8 * MiB, data)
    before = allocated(shm_file)
    digest = RamBlock.from_file("f", shm_file).digest()
    assert allocated(shm_file) == before == 4 * PAGE
    assert digest == content_digest(shm_file.read_bytes())  # read(2) allocates nothing


def test_the_checksum_tracker_reads_no_hole_and_sees_one_filled(shm_file: Path) -> None:
    sparse_file(shm_file, 16 * MiB, {0: b"x" * PAGE})
    tracker = ChecksumTracker(RamBlock.from_file("f", shm_file))
    tracker.block.take_dirty()
    assert tracker.scan() == 0 and allocated(shm_file) == PAGE
    with open(shm_file, "r+b") as f:  # another process writes into a hole
        f.seek(9 * MiB + 3 * PAGE)
        f.write(b"z")
    assert tracker.scan() == 1
    assert np.flatnonzero(tracker.block.take_dirty()).tolist() == [(9 * MiB + 3 * PAGE) // PAGE]
    assert allocated(shm_file) == 2 * PAGE


def test_a_migration_reads_no_hole_of_the_source_and_fills_none_of_the_destination(
        migration: Migration, shm_file: Path) -> None:
    rng = np.random.default_rng(2)
    extents = {0: rng.bytes(2 * MiB), 40 * MiB: rng.bytes(MiB + 5 * PAGE)}
    # Lone pages with short holes between them: a chunk written anyway would carry
    # such holes with its data if holes were not told apart from zero pages (more
    # of them than a chunk sends inline).
    extents |= {20 * MiB + 2 * PAGE * i: rng.bytes(PAGE) for i in range(40)}
    sparse_file(shm_file, 64 * MiB, extents)
    before = allocated(shm_file)
    source = RamBlock.from_file("ram", shm_file)
    destination = RamBlock.anonymous("ram", source.length, populate=False)
    migration.run([source], dest_blocks=[destination])
    assert migration.source_error is None and migration.destination_error is None
    assert migration.source is not None and migration.source.result.verified
    assert allocated(shm_file) == before
    assert destination.digest() == source.digest() == content_digest(shm_file.read_bytes())
    # Only chunks that hold data (registered: pinned, so faulted in) were touched
    # there.
    touched = np.flatnonzero(destination.populated_pages(0, destination.pages)) * PAGE // MiB
    assert set(touched.tolist()) <= {0, 1, 20, 40, 41}


def test_memory_given_back_like_a_balloon_is_neither_read_nor_filled(
        migration: Migration) -> None:
    # A guest's balloon driver gives pages back; QEMU discards them with
    # MADV_DONTNEED: they read as zero and hold no memory. The migration must not
    # fault them back in on either side.
    mapping = mmap.mmap(-1, 16 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    source = RamBlock("ram", mapping, owner=mapping,
                      residency=PrivateAnonymous(np.frombuffer(mapping, np.uint8).ctypes.data))
    source.array[:] = np.random.default_rng(4).integers(1, 256, source.length, np.uint8)
    mapping.madvise(mmap.MADV_DONTNEED, 4 * MiB, 8 * MiB)
    given_back = slice(4 * MiB // PAGE, 12 * MiB // PAGE)
    assert not source.populated_pages(given_back.start, given_back.stop).any()
    destination = RamBlock.anonymous("ram", source.length, populate=False)
    migration.run([source], dest_blocks=[destination])
    assert migration.source is not None and migration.source.result.verified
    assert not source.populated_pages(given_back.start, given_back.stop).any()
    assert not destination.populated_pages(given_back.start, given_back.stop).any()
    assert destination.digest() == source.digest()
    assert not destination.array[4 * MiB:12 * MiB].any()


def test_pagemap_scan_and_reading_pagemap_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = mmap.mmap(-1, 4 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_NOHUGEPAGE)  # one page touched is one page present
    block = RamBlock("a", memory)
    for page in (0, 1, 2, 300, 301, 1023):
        block.array[page * PAGE] = 1
    scanned = block.populated_pages(0, block.pages)
    parts = block.populated_pages(1, 302)
    if not populated._scan_works:
        pytest.skip("this kernel has no PAGEMAP_SCAN (Linux 6.7): only pagemap is read")
    monkeypatch.setattr(populated, "_scan_works", False)
    assert block.populated_pages(0, block.pages).tolist() == scanned.tolist()
    assert block.populated_pages(1, 302).tolist() == parts.tolist()
    assert np.flatnonzero(scanned).tolist() == [0, 1, 2, 300, 301, 1023]

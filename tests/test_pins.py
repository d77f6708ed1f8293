"""The source's pin table: registrations, holds, and what may be unpinned."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st
from rdmamig.engine.pins import Pin, PinTable, registration_units
from rdmamig.policy import ChunkId
from rdmamig.transport import MemoryRegion

MiB = 1 << 20


def pin(block: int, first: int, count: int) -> Pin:
    region = MemoryRegion(addr=(block << 40) + first * MiB, length=count * MiB,
                          lkey=block * 1000 + first + 1, rkey=7)
    return Pin(block=block, first=first, count=count, region=region, rkey=7)


def table() -> PinTable:
    return PinTable(lambda cid: MiB)


def test_a_held_chunk_ties_its_partner() -> None:
    pins = table()
    pair, single = pin(0, 0, 2), pin(0, 4, 1)
    assert [again for *_, again in pins.add(pair)] == [False, False]
    pins.add(single)
    pins.hold(ChunkId(0, 1))
    assert pins.unpinnable([ChunkId(0, 0), ChunkId(0, 4)]) == [single]
    candidates, tied = pins.candidates()
    assert set(candidates) == {ChunkId(0, 4)} and tied == 2 * MiB
    pins.release(ChunkId(0, 1))
    assert pins.unpinnable([ChunkId(0, 0), ChunkId(0, 1)]) == [pair]
    assert pins.candidates() == (pins.sizes, 0)


def test_holds_count_and_reregistrations_are_seen() -> None:
    pins = table()
    pins.add(pin(0, 3, 1))
    pins.hold(ChunkId(0, 3))
    pins.hold(ChunkId(0, 3))
    pins.release(ChunkId(0, 3))
    assert pins.held(ChunkId(0, 3))
    pins.release(ChunkId(0, 3))
    assert not pins.held(ChunkId(0, 3))
    assert pins.remove(pins[ChunkId(0, 3)]) == [ChunkId(0, 3)]
    assert ChunkId(0, 3) not in pins
    assert [again for *_, again in pins.add(pin(0, 3, 1))] == [True]


@given(st.sets(st.tuples(st.integers(0, 2), st.integers(0, 40))), st.booleans())
def test_units_cover_each_chunk_once_pairs_only_even_neighbours(
        wanted: set[tuple[int, int]], pairs: bool) -> None:
    chunks = [ChunkId(b, i) for b, i in wanted]
    units = registration_units(chunks, pairs=pairs)
    covered = [ChunkId(b, f + k) for b, f, count in units for k in range(count)]
    assert sorted(covered) == sorted(chunks)
    for _block, first, count in units:
        assert count == 1 or (pairs and count == 2 and first % 2 == 0)


@given(st.sets(st.tuples(st.integers(0, 2), st.integers(0, 40))))
def test_units_of_runs_are_the_runs_of_consecutive_chunks(wanted: set[tuple[int, int]]) -> None:
    chunks = [ChunkId(b, i) for b, i in wanted]
    units = registration_units(chunks, pairs=True, runs=True)
    covered = [ChunkId(b, f + k) for b, f, count in units for k in range(count)]
    assert covered == sorted(chunks)  # in order, each once, so each unit consecutive
    for (block, first, count), (after_block, after_first, _) in itertools.pairwise(units):
        assert (block, first + count) != (after_block, after_first)  # runs are whole
    # Without BATCH (a QEMU peer) a registration stays one chunk.
    assert {count for *_, count in registration_units(chunks, pairs=False, runs=True)} <= {1}


def test_the_peak_is_the_most_chunk_bytes_registered_at_once() -> None:
    # What the peer was asked to pin: a short last chunk counts its own bytes.
    pins = PinTable(lambda cid: MiB // 2 if cid.index == 9 else MiB)
    pair, last = pin(0, 0, 2), pin(0, 9, 1)
    pins.add(pair)
    pins.add(last)
    assert pins.peak_bytes == 2 * MiB + MiB // 2
    pins.remove(pair)
    pins.add(pin(0, 4, 1))
    assert pins.peak_bytes == 2 * MiB + MiB // 2  # 1.5 MiB now: the peak stays
    pins.clear()
    pins.add(pin(0, 2, 2))
    pins.add(pin(0, 6, 1))
    assert pins.peak_bytes == 3 * MiB  # cleared to 0, then 3 MiB: a new peak

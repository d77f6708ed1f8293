"""The destination's grant table, without a session: each chunk held by one
registration at most, requests inside one answered with it, overlaps refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rdmamig.engine.grants import GrantTable
from rdmamig.errors import RemoteProtocolError
from rdmamig.transport import MemoryRegion

MiB = 1 << 20


def region(first: int, count: int, *, rkey: int = 1, tail: int = 0) -> MemoryRegion:
    return MemoryRegion(addr=first * MiB, length=count * MiB - tail, lkey=first + 1, rkey=rkey)


def test_a_request_inside_a_registration_is_answered_with_it() -> None:
    grants = GrantTable([8])
    pair = region(2, 2)
    assert grants.holding(0, 2, 2) is None
    grants.add(0, 2, 2, pair)
    assert grants.holding(0, 2, 2) is pair
    assert grants.holding(0, 3, 1) is pair  # QEMU asks for the second chunk alone
    assert grants.holding(0, 4, 1) is None


@pytest.mark.parametrize(("first", "count"), [(1, 2), (3, 2), (1, 4), (0, 8)])
def test_a_request_overlapping_a_registration_is_refused(first: int, count: int) -> None:
    grants = GrantTable([8])
    grants.add(0, 2, 2, region(2, 2))
    with pytest.raises(RemoteProtocolError, match="overlap a registration they do not lie"):
        grants.holding(0, first, count)


def test_two_neighbours_are_not_one() -> None:
    grants = GrantTable([8])
    grants.add(0, 2, 1, region(2, 1))
    grants.add(0, 3, 1, region(3, 1, rkey=2))
    with pytest.raises(RemoteProtocolError, match="overlap"):
        grants.holding(0, 2, 2)


def test_only_the_first_chunk_names_a_registration() -> None:
    grants = GrantTable([8, 4])
    pair = region(2, 2)
    grants.add(1, 2, 2, pair)
    for block, first in ((1, 3), (0, 2), (1, 0)):
        with pytest.raises(RemoteProtocolError, match=f"chunk {first} of block {block} is "
                                                      f"not registered"):
            grants.remove(block, first)
    assert grants.remove(1, 2) is pair
    assert grants.holding(1, 2, 2) is None  # both chunks are free again
    with pytest.raises(RemoteProtocolError, match="not registered"):
        grants.remove(1, 2)


def test_a_short_last_chunk_is_freed_too() -> None:
    grants = GrantTable([3])
    grants.add(0, 1, 2, region(1, 2, tail=MiB // 2))  # the block ends halfway chunk 2
    grants.remove(0, 1)
    grants.add(0, 2, 1, region(2, 1, tail=MiB // 2))


def test_whole_blocks_answer_every_request_and_are_released() -> None:
    grants = GrantTable([4, 2])
    blocks = [region(0, 4), region(0, 2, rkey=9)]
    grants.add_whole(blocks)
    assert grants.whole_blocks and grants.holding(1, 1, 1) is blocks[1]
    assert grants.whole(0) is blocks[0]
    assert grants.clear() == blocks and not grants.whole_blocks


@given(st.lists(st.tuples(st.integers(0, 15), st.integers(1, 2), st.booleans()),
                max_size=40))
def test_no_chunk_is_ever_held_twice(steps: list[tuple[int, int, bool]]) -> None:
    # Any sequence of requests and drops: the chunks held are exactly those of the
    # registrations kept, each in one registration.
    grants = GrantTable([16])
    kept: dict[int, int] = {}
    for first, count, drop in steps:
        count = min(count, 16 - first)
        if drop:
            if first in kept:
                grants.remove(0, first)
                del kept[first]
            continue
        try:
            held = grants.holding(0, first, count)
        except RemoteProtocolError:
            continue
        if held is None:
            grants.add(0, first, count, region(first, count))
            kept[first] = count
    covered = [c for f, n in kept.items() for c in range(f, f + n)]
    assert len(covered) == len(set(covered))
    for chunk in range(16):
        inside = chunk in covered
        try:
            assert (grants.holding(0, chunk, 1) is not None) == inside
        except RemoteProtocolError:
            raise AssertionError(f"chunk {chunk} is held by two registrations") from None
    assert len(grants.clear()) == len(kept)

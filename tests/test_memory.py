"""RAM blocks: dirty bitmap and the vectorised zero-page scan."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rdmamig.memory import RamBlock


def test_mark_dirty_covers_every_touched_page() -> None:
    block = RamBlock.anonymous("b", 16 * 4096)
    block.take_dirty()
    block.mark_dirty(4095, 2)  # straddles pages 0 and 1
    block.mark_dirty(10 * 4096, 4096)
    assert np.flatnonzero(block.take_dirty()).tolist() == [0, 1, 10]
    assert block.dirty_pages() == 0


def test_mark_dirty_outside_the_block_is_refused() -> None:
    block = RamBlock.anonymous("b", 4096)
    with pytest.raises(ValueError, match=r"mark_dirty\(4000, 200\) is outside block 'b'"):
        block.mark_dirty(4000, 200)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 63), st.integers(0, 4095), st.integers(1, 255)),
                max_size=40))
def test_nonzero_pages_matches_a_full_scan(writes: list[tuple[int, int, int]]) -> None:
    block = RamBlock.anonymous("b", 64 * 4096)
    for page, offset, value in writes:
        block.array[page * 4096 + offset] = value
    expected = block.array.reshape(64, 4096).any(axis=1)
    assert block.nonzero_pages(0, 64).tolist() == expected.tolist()
    assert block.nonzero_pages(5, 37).tolist() == expected[5:37].tolist()


def test_nonzero_pages_sees_a_byte_at_the_very_end_of_a_page() -> None:
    block = RamBlock.anonymous("b", 8 * 4096)
    block.array[:] = 1
    block.array[3 * 4096:4 * 4096] = 0
    block.array[4 * 4096:5 * 4096 - 1] = 0  # page 4: only its last byte is set
    assert block.nonzero_pages(0, 8).tolist() == [True] * 3 + [False, True] + [True] * 3


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 63), st.integers(0, 4095), st.integers(0, 255)),
                max_size=40))
def test_nonzero_pages_of_a_sparse_file_match_a_full_scan(
        writes: list[tuple[int, int, int]]) -> None:
    # Pages written with a zero byte are populated and zero; holes are not read.
    with tempfile.TemporaryFile() as file:
        file.truncate(64 * 4096)
        for page, offset, value in writes:
            file.seek(page * 4096 + offset)
            file.write(bytes([value]))
        file.flush()
        block = RamBlock.from_file("f", Path(f"/proc/self/fd/{file.fileno()}"))
        expected = block.array.reshape(64, 4096).any(axis=1)
        assert block.nonzero_pages(0, 64).tolist() == expected.tolist()
        assert block.nonzero_pages(9, 50).tolist() == expected[9:50].tolist()

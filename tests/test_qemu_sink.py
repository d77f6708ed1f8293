"""Decoded pages into RAM blocks: what a zero record writes depends on whether the
blocks start zeroed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from rdmamig.memory import RamBlock
from rdmamig.qemu.sink import BlockSink

PAGE = 4096


def test_zero_records_write_over_blocks_that_hold_data() -> None:
    block = RamBlock.anonymous("mem", 4 * PAGE)
    block.array[:] = 7
    sink = BlockSink([block], zeroed=False)
    sink.zero(0, np.array([1, 2], np.uint64), np.zeros(2, np.uint8))
    assert block.reads_zero(PAGE, 2 * PAGE) and block.array[:PAGE].min() == 7


def test_a_zeroed_block_is_written_only_where_it_had_data() -> None:
    block = RamBlock.anonymous("mem", 4 * PAGE)
    sink = BlockSink([block], zeroed=True)
    sink.pages(0, np.array([0, 1], np.uint64), np.full((2, PAGE), 5, np.uint8))
    sink.pages(0, np.array([3], np.uint64), np.full((1, PAGE), 6, np.uint8))
    # Page 1 had data and is zeroed; page 2 never had any and is left alone; page 3
    # gets a fill byte.
    sink.zero(0, np.array([1, 2, 3], np.uint64), np.array([0, 0, 9], np.uint8))
    pages = block.array.reshape(4, PAGE)
    assert (pages[0] == 5).all() and not pages[1].any() and not pages[2].any()
    assert (pages[3] == 9).all()


def test_a_fill_byte_is_written_into_a_page_never_written_before() -> None:
    # QEMU's ZERO record carries a byte to fill the page with (always 0 from QEMU's
    # own save_zero_page, but the format allows any): honoured on a fresh page too.
    block = RamBlock.anonymous("mem", 3 * PAGE)
    sink = BlockSink([block], zeroed=True)
    sink.zero(0, np.array([1], np.uint64), np.array([0x5A], np.uint8))
    pages = block.array.reshape(3, PAGE)
    assert (pages[1] == 0x5A).all() and not pages[0].any() and not pages[2].any()


def test_pages_that_find_no_room_on_disk_are_an_error_not_a_signal(small_disk: Path) -> None:
    # Decoded pages go into an image's mapped files: a store there with the disk full
    # would be a SIGBUS, the end of the process (here a child of its own).
    script = textwrap.dedent(f"""
        import numpy as np
        from pathlib import Path
        from rdmamig.errors import ImageError
        from rdmamig.memory import RamBlock
        from rdmamig.qemu.sink import BlockSink
        block = RamBlock.from_file("mem", Path("{small_disk}/mem"), length=128 << 20)
        sink = BlockSink([block], zeroed=True)
        try:
            sink.pages(0, np.arange(0, 2 * 12288, 2, dtype=np.uint64),
                       np.full((12288, 4096), 1, np.uint8))
        except ImageError as exc:
            print(exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "RAM block 'mem': no room for 4096 bytes" in done.stdout

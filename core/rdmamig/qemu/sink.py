"""Where decoded ``ram`` records go: the pages of a set of RAM blocks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ..memory import RamBlock
from .ram import PAGE_SIZE


class BlockSink:
    """Writes decoded pages into ``blocks`` (a :class:`~rdmamig.qemu.ram.RecordSink`).

    Args:
        blocks: the RAM blocks, in the order of the stream's setup.
        zeroed: the blocks are all zero to begin with (a new image's sparse files):
            then a zero page only costs a write where the block has had data.
    """

    def __init__(self, blocks: Sequence[RamBlock], *, zeroed: bool) -> None:
        self._blocks = list(blocks)
        self._pages = [b.array.reshape(b.pages, PAGE_SIZE) for b in self._blocks]
        make = np.zeros if zeroed else np.ones
        self._written = [make(b.pages, dtype=np.bool_) for b in self._blocks]

    def pages(self, block: int, numbers: npt.NDArray[np.uint64],
              data: npt.NDArray[np.uint8]) -> None:
        first = int(numbers[0])
        self._allocate(block, numbers)
        if len(numbers) > 1 and bool((np.diff(numbers) == 1).all()):
            # Consecutive pages (a bulk round is in address order): fault the span in
            # at once and copy it as one slice.
            self._blocks[block].prefault(first * PAGE_SIZE, len(numbers) * PAGE_SIZE)
            self._pages[block][first:first + len(numbers)] = data
        else:
            self._pages[block][numbers] = data
        self._written[block][numbers] = True

    def zero(self, block: int, numbers: npt.NDArray[np.uint64],
             fills: npt.NDArray[np.uint8]) -> None:
        touch = self._written[block][numbers] | (fills != 0)
        if touch.any():
            self._allocate(block, numbers[touch])
            self._pages[block][numbers[touch]] = fills[touch, None]
            self._written[block][numbers[fills != 0]] = True


    def _allocate(self, block: int, numbers: npt.NDArray[np.uint64]) -> None:
        """Make room for pages ``numbers`` before they are stored (a file-backed
        block's file, :meth:`RamBlock.allocate`), a run of consecutive ones at a time."""
        pages = numbers.astype(np.int64)
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        for run in np.split(pages, breaks):
            self._blocks[block].allocate(int(run[0]) * PAGE_SIZE, len(run) * PAGE_SIZE)

"""Memory and files as the kernel holds them, for the tests and the harness's
checks: which page frames back a buffer, sparse files, what a file allocates."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
from rdmamig.populated import pagemap_entries

PAGE = 4096
_FRAME_BITS = np.uint64((1 << 55) - 1)  # a pagemap entry's bits 0-54: the page frame


def page_frames(pages: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """The page frame of each page (a row of ``pages``) of this process, from its
    pagemap (root reads real frame numbers)."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        return pagemap_entries(fd, pages.ctypes.data // PAGE, len(pages)) & _FRAME_BITS
    finally:
        os.close(fd)


def sparse_file(path: Path, length: int, data: Mapping[int, bytes]) -> None:
    """A file of ``length`` bytes holding ``data`` at its offsets, holes elsewhere."""
    with path.open("wb") as f:
        f.truncate(length)
        for offset, chunk in data.items():
            f.seek(offset)
            f.write(chunk)


def allocated(path: Path) -> int:
    """Bytes the filesystem has allocated for ``path``."""
    return os.stat(path).st_blocks * 512

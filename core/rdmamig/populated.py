"""Which pages of memory hold data, found without touching them.

A page that is not populated reads as zero, but reading it through a mapping is
not free: a hole of a tmpfs file (a VM's ``/dev/shm`` memory backend) is allocated
by the read fault, and a registration pins it. So the source sends such pages as
COMPRESS of zero without reading them, and the destination leaves them alone. The
kernel says which pages hold data:

* for a file, ``lseek(SEEK_DATA / SEEK_HOLE)`` (tmpfs and the usual disk
  filesystems answer per page or block; others report the whole file as data);
* for a private anonymous mapping, ``/proc/self/pagemap``: a page neither present
  (bit 63) nor swapped (bit 62) was never written or was given back (MADV_DONTNEED,
  a balloon). For a shared mapping a page absent from the page table may still
  hold data, so only private anonymous memory is judged by pagemap.

Anything else is taken as populated: the rules only ever skip a page the kernel
vouches for.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .wire import PAGE_BYTES as PAGE_SIZE

BoolArray = npt.NDArray[np.bool_]

#: pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
PRESENT = np.uint64(1 << 63)
SWAPPED = np.uint64(1 << 62)


class Residency(Protocol):
    """Tells which pages of a block hold data."""

    #: What the answers rest on, for reports and logs.
    kind: str

    def pages(self, first: int, last: int) -> BoolArray:
        """Which pages in ``[first, last)`` (of the block) may hold data."""


class Everything:
    """Memory the kernel cannot vouch for: every page is taken as populated."""

    kind = "none"

    def pages(self, first: int, last: int) -> BoolArray:
        return np.ones(last - first, dtype=np.bool_)


class FileExtents:
    """A file's data, by ``lseek(SEEK_DATA / SEEK_HOLE)`` on ``fd`` (not owned)."""

    kind = "file extents"

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def pages(self, first: int, last: int) -> BoolArray:
        start, end = first * PAGE_SIZE, last * PAGE_SIZE
        mask = np.zeros(last - first, dtype=np.bool_)
        for data, hole in data_extents(self._fd, start, end):
            # A page partly inside an extent holds data.
            mask[(data - start) // PAGE_SIZE:-(-(hole - start) // PAGE_SIZE)] = True
        return mask


class PrivateAnonymous:
    """Private anonymous memory at ``address``, by this process's pagemap: the
    ``PAGEMAP_SCAN`` ioctl where the kernel has it (Linux 6.7), which returns the
    ranges of present or swapped pages in one call, else 8 bytes read per page."""

    kind = "pagemap"

    def __init__(self, address: int) -> None:
        self._first_page = address // PAGE_SIZE

    def pages(self, first: int, last: int) -> BoolArray:
        mask = np.zeros(last - first, dtype=np.bool_)
        if not len(mask):
            return mask
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            start = (self._first_page + first) * PAGE_SIZE
            regions = _scan(fd, start, start + len(mask) * PAGE_SIZE)
            if regions is None:
                entries = pagemap_entries(fd, self._first_page + first, len(mask))
                return np.asarray(entries & (PRESENT | SWAPPED) != 0, dtype=np.bool_)
        finally:
            os.close(fd)
        for low, high in regions:
            mask[(low - start) // PAGE_SIZE:(high - start) // PAGE_SIZE] = True
        return mask


def pagemap_entries(fd: int, first_page: int, count: int) -> npt.NDArray[np.uint64]:
    """``count`` pagemap entries from virtual page ``first_page`` on, read from the
    pagemap ``fd`` (``/proc/PID/pagemap``).

    Raises:
        OSError: the pagemap cannot be read, or ends before them.
    """
    entries = np.zeros(count, dtype=np.uint64)
    if os.preadv(fd, [entries.data], first_page * 8) != entries.nbytes:
        raise OSError(f"the pagemap ended before page {first_page + count:#x}")
    return entries


#: PAGEMAP_SCAN: _IOWR('f', 16, struct pm_scan_arg) (include/uapi/linux/fs.h).
_PAGEMAP_SCAN = 0xC0606610
_PM_SCAN_ARG = struct.Struct("=12Q")
_PAGE_IS_PRESENT = 1 << 3
_PAGE_IS_SWAPPED = 1 << 4
#: Regions returned per call.
_SCAN_REGIONS = 1024
#: Whether the kernel has PAGEMAP_SCAN (found at the first call).
_scan_works: bool | None = None


def _scan(fd: int, start: int, end: int) -> list[tuple[int, int]] | None:
    """``[low, high)`` address ranges of present or swapped pages in ``[start,
    end)``, by PAGEMAP_SCAN on the pagemap ``fd``; None where the kernel has no
    PAGEMAP_SCAN."""
    global _scan_works
    if _scan_works is False:
        return None
    vec = np.zeros((_SCAN_REGIONS, 3), dtype=np.uint64)  # struct page_region
    found: list[tuple[int, int]] = []
    at = start
    while at < end:
        arg = bytearray(_PM_SCAN_ARG.pack(
            _PM_SCAN_ARG.size, 0, at, end, 0, vec.ctypes.data, _SCAN_REGIONS, 0, 0,
            0, _PAGE_IS_PRESENT | _PAGE_IS_SWAPPED, _PAGE_IS_PRESENT | _PAGE_IS_SWAPPED))
        try:
            count = fcntl.ioctl(fd, _PAGEMAP_SCAN, arg, True)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL) and not found and at == start:
                _scan_works = False
                return None
            raise
        _scan_works = True
        found += [(int(low), int(high)) for low, high, _categories in vec[:count].tolist()]
        walked = _PM_SCAN_ARG.unpack(arg)[4]  # walk_end
        if walked <= at:
            break
        at = walked
    return found


def data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """``[data, hole)`` byte ranges of the file ``fd`` that hold data within
    ``[start, end)``; the whole range when the filesystem cannot tell."""
    extents: list[tuple[int, int]] = []
    at = start
    while at < end:
        try:
            data = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from here to the end of the file
                break
            return [(start, end)]
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        extents.append((data, min(hole, end)))
        at = hole
    return extents


def is_private_anonymous(address: int, length: int, *, maps: str | None = None) -> bool:
    """Whether ``[address, address + length)`` lies wholly in private anonymous
    mappings of this process (``maps``: the text of ``/proc/self/maps``)."""
    if maps is None:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            maps = f.read()
    end, covered = address + length, address
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if high <= covered:
            continue
        if low > covered:  # a gap: not mapped at all
            return False
        path = fields[5] if len(fields) > 5 else ""
        if fields[1][3] != "p" or fields[4] != "0" or path.startswith("/"):
            return False
        covered = high
        if covered >= end:
            return True
    return False

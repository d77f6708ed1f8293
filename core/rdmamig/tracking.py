"""Which pages another process wrote: the kernel's soft-dirty bits where they can
be trusted, per-page checksums (:class:`~rdmamig.memory.ChecksumTracker`) where not.

For memory rdmamig maps but does not write – a VM's ``/dev/shm`` RAM file written by
the VM (``send --live --pause-pid PID``) – each pass must find what changed. The
checksum tracker reads the whole block every pass. The kernel can say instead, as
CRIU's pre-dump asks it: ``echo 4 > /proc/PID/clear_refs`` clears the soft-dirty
bit of every page table entry of the process and write-protects them; a later
write faults and sets the bit again, and ``/proc/PID/pagemap`` shows it (bit 55).
Reading 8 bytes per page of the writer's mapping replaces hashing 4096.

The bits are kept in the writer's page table entries, so they are trusted only
where nothing can drop an entry behind our back (:func:`soft_dirty_refusal`): a
tmpfs file (no writeback), no swap (no reclaim of its pages), no huge pages for it
(khugepaged would rebuild the entries), and no other process mapping it (its
writes would not be seen). Anything that breaks that mid-migration – the process
maps the block elsewhere, unmaps it, exits, or its pagemap cannot be read – makes
the tracker say the whole block is dirty once and go on with checksums: a dirty
page is never missed silently. Writes through ``write(2)`` rather than the
mapping are not seen by soft-dirty: ``--tracker checksum`` is for such writers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import mmap
import os
from pathlib import Path
from typing import Protocol

import attrs
import numpy as np

from .errors import ConfigurationError, MigrationError
from .memory import PAGE_SIZE, ChecksumTracker, RamBlock
from .pinning import buffer_address
from .populated import pagemap_entries
from .workload import PausedProcess

log = logging.getLogger("rdmamig.tracking")

#: pagemap: the page table entry's soft-dirty bit (admin-guide/mm/soft-dirty.rst).
SOFT_DIRTY = np.uint64(1 << 55)
#: What ``/proc/PID/clear_refs`` takes to clear the soft-dirty bits.
_CLEAR_SOFT_DIRTY = b"4"
#: The choices of ``send --tracker``.
TRACKERS = ("auto", "soft-dirty", "checksum")


class DirtyTracker(Protocol):
    """Finds the pages of a block that another process wrote since the last scan."""

    #: What it rests on (``soft-dirty``, ``checksum``), for reports and logs.
    method: str

    def scan(self) -> int:
        """Mark what was written since the last scan dirty in the block; returns
        how many pages were marked."""


@attrs.frozen
class Mapping:
    """A shared mapping of a block's file in another process: its addresses
    ``[low, high)`` show the file from byte ``offset``."""

    low: int
    high: int
    offset: int


def shared_mappings(pid: int, path: Path) -> list[Mapping]:
    """The shared mappings of the file at ``path`` in process ``pid``, from
    ``/proc/PID/maps`` (the file is matched by device and inode, not by name).

    Raises:
        OSError: the process is gone or its maps cannot be read.
    """
    stat = os.stat(path)
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}"
    found = []
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if (len(fields) < 5 or fields[3] != device or int(fields[4]) != stat.st_ino
                    or fields[1][3] != "s"):
                continue
            low, high = (int(x, 16) for x in fields[0].split("-"))
            found.append(Mapping(low, high, int(fields[2], 16)))
    return found


def other_mappers(path: Path, *, exclude: set[int]) -> list[int]:
    """Processes other than ``exclude`` that map the file at ``path`` shared."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        with contextlib.suppress(OSError):  # gone, or a kernel thread's empty maps
            if shared_mappings(int(entry), path):
                pids.append(int(entry))
    return pids


@functools.cache
def kernel_keeps_soft_dirty() -> bool:
    """Whether this kernel keeps soft-dirty bits (``CONFIG_MEM_SOFT_DIRTY``): a
    page just written by this process shows the bit in its pagemap entry."""
    page = mmap.mmap(-1, PAGE_SIZE)
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        page[0] = 1
        with memoryview(page) as view:
            first_page = buffer_address(view) // PAGE_SIZE
        return bool(pagemap_entries(fd, first_page, 1)[0] & SOFT_DIRTY)
    finally:
        os.close(fd)
        page.close()


def soft_dirty_refusal(path: Path, pid: int) -> str | None:
    """Why the soft-dirty bits of process ``pid``'s mappings of ``path`` cannot be
    trusted to find every write to it; None: they can."""
    if not kernel_keeps_soft_dirty():
        return "this kernel keeps no soft-dirty bits (CONFIG_MEM_SOFT_DIRTY)"
    options = _tmpfs_options(path)
    if options is None:
        return (f"{path} is not on tmpfs (the kernel drops the bits when it writes a "
                f"file's pages back)")
    if _swap_in_use():
        return "swap is on (the kernel drops the bits of a tmpfs page it swaps out)"
    huge = options.get("huge", "never")
    with contextlib.suppress(OSError):
        if "[force]" in Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text():
            huge = "force"
    if huge not in ("never", "deny"):
        return f"tmpfs huge pages ({huge}): khugepaged would drop the bits"
    try:
        mappings = shared_mappings(pid, path)
    except OSError as exc:
        return f"the maps of process {pid} cannot be read: {exc.strerror}"
    if not mappings:
        return f"process {pid} does not map {path} shared"
    if others := other_mappers(path, exclude={pid, os.getpid()}):
        return (f"process(es) {', '.join(map(str, others))} map {path} too, and only "
                f"{pid}'s writes would be seen")
    if not os.access(f"/proc/{pid}/clear_refs", os.W_OK):
        return f"/proc/{pid}/clear_refs is not writable here"
    return None


def _tmpfs_options(path: Path) -> dict[str, str] | None:
    """The mount options of the filesystem holding ``path`` if it is tmpfs."""
    resolved = os.path.realpath(path)
    best, fstype, options = "", "", ""
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 4:
                continue
            mount = fields[1].encode().decode("unicode_escape")  # \040 for a space
            inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, fstype, options = mount, fields[2], fields[3]
    if fstype != "tmpfs":
        return None
    return {key: value for key, _eq, value in (o.partition("=") for o in options.split(","))}


def _swap_in_use() -> bool:
    with open("/proc/swaps", encoding="utf-8") as f:
        return len(f.read().splitlines()) > 1


class SoftDirtyTracker:
    """Finds the pages process ``process`` wrote to ``block`` (the file ``path``)
    by the soft-dirty bits of its mappings of it. Each scan holds the process
    stopped while it reads and clears the bits, so that no write falls between the
    two. The caller checks :func:`soft_dirty_refusal` first.

    Raises:
        OSError: the process's maps, pagemap or clear_refs cannot be used.
    """

    method = "soft-dirty"

    def __init__(self, block: RamBlock, path: Path, process: PausedProcess) -> None:
        assert process.pid is not None
        self.block, self.path, self.process = block, path, process
        self._fallback: ChecksumTracker | None = None
        with process.held():
            self._mappings = shared_mappings(process.pid, path)
            self._clear()

    def scan(self) -> int:
        """Mark the pages written since the last scan dirty; returns how many."""
        if self._fallback is not None:
            return self._fallback.scan()
        pid = self.process.pid
        assert pid is not None
        try:
            with self.process.held():
                mappings = shared_mappings(pid, self.path)
                if mappings != self._mappings:
                    return self._fall_back(f"process {pid} mapped or unmapped {self.path}")
                entries = self._entries(pid, mappings)
                self._clear()
        except (OSError, MigrationError) as exc:  # gone, or its /proc unreadable
            return self._fall_back(f"process {pid} cannot be tracked any more: {exc}")
        dirty = np.zeros(self.block.pages, dtype=np.bool_)
        for mapping, found in zip(mappings, entries, strict=True):
            first = mapping.offset // PAGE_SIZE
            shown = found[:max(self.block.pages - first, 0)]
            dirty[first:first + len(shown)] |= (shown & SOFT_DIRTY) != 0
        self.block.mark_pages_dirty(dirty)
        return int(np.count_nonzero(dirty))

    @staticmethod
    def _entries(pid: int, mappings: list[Mapping]) -> list[np.ndarray]:
        """Each mapping's pagemap entries."""
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return [pagemap_entries(fd, mapping.low // PAGE_SIZE,
                                    (mapping.high - mapping.low) // PAGE_SIZE)
                    for mapping in mappings]
        finally:
            os.close(fd)

    def _clear(self) -> None:
        with open(f"/proc/{self.process.pid}/clear_refs", "wb") as f:
            f.write(_CLEAR_SOFT_DIRTY)

    def _fall_back(self, why: str) -> int:
        """Whatever was written since the last scan is unknown: all of it is
        dirty, and checksums find what changes from now on."""
        log.warning("block %s: %s; every page is taken as dirty and checksums track "
                    "it from now on", self.block.name, why)
        self.method = "checksum (soft-dirty until " + why + ")"
        self._fallback = ChecksumTracker(self.block)
        self.block.mark_pages_dirty(np.ones(self.block.pages, dtype=np.bool_))
        return self.block.pages


def choose_tracker(block: RamBlock, path: Path, process: PausedProcess, *,
                   wanted: str = "auto") -> DirtyTracker:
    """The tracker for ``block`` (the file ``path``) written by ``process``:
    ``wanted`` ``soft-dirty`` or ``checksum``, or ``auto`` (soft-dirty where it can
    be trusted, else checksums). It says at ``-v`` which it chose and why.

    Raises:
        ConfigurationError: ``soft-dirty`` was asked for and cannot be trusted.
    """
    if wanted not in TRACKERS:
        raise ConfigurationError(f"unknown tracker {wanted!r} (one of {', '.join(TRACKERS)})")
    refusal = ("--tracker checksum" if wanted == "checksum"
               else "no --pause-pid names the writer" if process.pid is None
               else soft_dirty_refusal(path, process.pid))
    if refusal is None:
        try:
            tracker = SoftDirtyTracker(block, path, process)
        except OSError as exc:
            refusal = f"process {process.pid} cannot be tracked: {exc}"
        else:
            log.info("block %s: soft-dirty bits of process %s find its writes", block.name,
                     process.pid)
            return tracker
    if wanted == "soft-dirty":
        raise ConfigurationError(f"--tracker soft-dirty for block {block.name}: {refusal}")
    log.info("block %s: checksums find the writes (%s)", block.name, refusal)
    checksums = ChecksumTracker(block)
    checksums.method = f"checksum ({refusal})"
    return checksums
